"""What a stage trial keeps in each Tune checkpoint, for the RLlib loop and random search alike:
the iteration reached and the best reward so far (``trial_state.json``), beside whatever the
loop itself saves (the RLlib algorithm).

Each iteration also draws its random numbers from a generator seeded with ``(seed,
iteration)`` (:func:`iteration_seed`), not from one carried over from the iterations before:
a trial restored from the checkpoint of iteration ``k - 1`` then replays iteration ``k`` with
the same actions an uninterrupted trial takes, so its children come from the reward cache.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from ray import tune

STATE_FILE = "trial_state.json"


def iteration_seed(seed: int, iteration: int) -> int:
    """The seed of one iteration's random draws: a function of the run's seed and the
    iteration alone, so that a replayed iteration draws what the first one drew."""
    return int(np.random.SeedSequence([int(seed), int(iteration)]).generate_state(1)[0])


def restore(load: Callable[[Path], None] | None = None) -> tuple[int, float]:
    """The iteration and best reward a trial continues from: ``(0, -inf)`` for a new trial,
    else its latest checkpoint's, after ``load(folder)`` restores what else it holds."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return 0, float("-inf")
    with checkpoint.as_directory() as folder:
        if load is not None:
            load(Path(folder))
        state = json.loads((Path(folder) / STATE_FILE).read_text())
    return int(state["iteration"]), float(state["best_reward"])


def report(
    metrics: dict[str, Any], iteration: int, best: float, save: Callable[[Path], None] | None = None
) -> None:
    """Reports one iteration to Tune with a checkpoint: the state, and what ``save(folder)``
    writes beside it."""
    with tempfile.TemporaryDirectory() as folder:
        if save is not None:
            save(Path(folder))
        state = {"iteration": iteration, "best_reward": best}
        (Path(folder) / STATE_FILE).write_text(json.dumps(state))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
