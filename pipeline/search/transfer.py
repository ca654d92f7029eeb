"""Policy transfer: a search that starts from the policy another run learned (N2N's transfer).

N2N's policies read a teacher as a sequence of unit descriptors with a recurrent network and
score every unit with one shared head, so their weights do not depend on how many units a
teacher has: a policy learned on ResNet-18 can start the search on ResNet-34
(``search.policy_from``, ``n2n run --policy-from RUN_DIR``). Each stage starts from the final
policy of the same stage of that run (its last Tune checkpoint); with
``search.freeze_policy`` it is only evaluated, never trained (N2N's zero-shot transfer).

Everything is checked before Ray starts (:func:`check_transfer`): the run, the stage's
checkpoint, and that the policy's tensors have the shapes this run's policy has.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import yaml

from envs.graph import COL, NUM_FEATURES
from pipeline.search.policies import module_spec
from pipeline.search.records import STAGES

MODULE_STATE = Path("algo/learner_group/learner/rl_module/default_policy/module_state.pkl")
"""Where an RLlib checkpoint of a stage trial keeps the policy's weights."""


class TransferError(ValueError):
    """A policy that cannot start this run's search; exit code 2."""


def policy_checkpoint(run_dir: str | Path, stage: str) -> Path:
    """The policy weights (``module_state.pkl``) of ``stage``'s last checkpoint in a run."""
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise TransferError(
            f"search.policy_from {run_dir}: no config.yaml there; give the directory of an "
            "earlier n2n run"
        )
    storage = (yaml.safe_load(config.read_text()).get("output") or {}).get("storage_path")
    tune = Path(storage) if storage and "://" not in storage else run_dir / "tune"
    if not tune.is_dir():  # the run directory was moved: its default Tune storage moved too
        tune = run_dir / "tune"
    found = list((tune / stage).glob(f"*/checkpoint_*/{MODULE_STATE}"))
    trials = {p.relative_to(tune / stage).parts[0] for p in found}
    if not found:
        raise TransferError(
            f"search.policy_from {run_dir} has no {stage} policy (the stage was skipped, used "
            "random search, or never finished an iteration)"
        )
    if len(trials) > 1:
        raise TransferError(
            f"search.policy_from {run_dir} holds {len(trials)} {stage} trials (a sweep); give "
            "the directory of a single n2n run"
        )
    return max(found, key=_index)


def _index(path: Path) -> int:
    match = re.search(r"checkpoint_(\d+)", str(path))
    return int(match.group(1)) if match else -1


def load_policy(path: str | Path) -> dict[str, torch.Tensor]:
    """A policy's weights from an RLlib checkpoint, as tensors."""
    with open(path, "rb") as fh:
        state = pickle.load(fh)  # noqa: S301 (RLlib's own checkpoint format, written by a run)
    return {k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}


def expected_shapes(
    policy: str, hidden: int, stage: str, choices: int, sequential: bool
) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of this run's policy for ``stage`` (they do not depend on the units)."""
    units = 4
    obs = gym.spaces.Box(0.0, 1.0, (units, NUM_FEATURES), np.float32)
    if stage == "shrinkage" and sequential:
        action: gym.Space = gym.spaces.Discrete(choices)
    else:
        action = gym.spaces.MultiDiscrete([choices] * units)
    column = COL["removable"] if stage == "removal" else COL["shrinkable"]
    spec, _ = module_spec(policy, action, hidden=hidden, mask_column=column,
                          autoregressive=stage == "shrinkage")  # fmt: skip
    spec.observation_space, spec.action_space = obs, action
    module = spec.build()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def check_transfer(cfg: Any) -> dict[str, str]:
    """The policy checkpoint each enabled stage starts from, checked; {} without a source.

    Raises:
        TransferError: one sentence naming the run, the stage and what does not fit.
    """
    source = cfg.search.policy_from
    if source is None:
        return {}
    if cfg.search.policy != "lstm":
        raise TransferError(
            f"search.policy_from needs search.policy=lstm (this run's is {cfg.search.policy}): an "
            "MLP's input size is tied to its teacher's number of units"
        )
    if cfg.search.algo == "random":
        raise TransferError("search.policy_from gives a policy, but search.algo=random has none")
    paths = {}
    for stage in STAGES:
        if not cfg.stage(stage).enabled:
            continue
        path = policy_checkpoint(source, stage)
        choices = 2 if stage == "removal" else len(cfg.shrinkage.ratios)
        want = expected_shapes("lstm", cfg.search.hidden, stage, choices,
                               cfg.shrinkage.sequential)  # fmt: skip
        have = {k: tuple(v.shape) for k, v in load_policy(path).items()}
        for key in sorted(set(want) | set(have)):
            if want.get(key) != have.get(key):
                raise TransferError(
                    f"search.policy_from {source}: its {stage} policy has {key} of shape "
                    f"{have.get(key)} but this run's has {want.get(key)}; give the same "
                    f"search.hidden ({cfg.search.hidden} here), policy and, for shrinkage, the "
                    "same number of shrinkage.ratios and shrinkage.sequential"
                )
        paths[stage] = str(path)
    return paths


def source_record(run_dir: str | Path) -> dict[str, Any]:
    """Where a transferred policy came from: the run directory and its MLflow run."""
    run_dir = Path(run_dir)
    state = run_dir / "state.json"
    mlflow = (json.loads(state.read_text()).get("mlflow") or {}) if state.is_file() else {}
    return {"run_dir": str(run_dir), "mlflow_run_id": mlflow.get("run_id")}


def start_from(algo: Any, path: str) -> None:
    """Loads a transferred policy into a freshly built algorithm and its env runners."""
    state = load_policy(path)
    algo.learner_group.foreach_learner(
        lambda learner: learner.module["default_policy"].load_state_dict(state)
    )
    algo.env_runner_group.sync_weights(from_worker_or_learner_group=algo.learner_group)
