"""Random search: the baseline an RL search must beat (``--algo random``).

It samples uniformly from the same action space as the RL policy and evaluates the same
number of children (``iterations * episodes_per_iteration``), through the same env, recorder
and evaluator, reporting to Tune per iteration exactly like an RLlib stage trial. Children in
one iteration are played by ``env_runners`` env workers, each a Ray actor in the trial's
placement group waiting on its child's evaluation, so the evaluations in flight match the RL
search's. Processes, not threads, as RLlib's env runners: surgery traces with ``torch.fx``,
which patches ``nn.Module.__call__`` process-wide while it traces, and the envs save and
restore the global random state around each child; threads sharing a process corrupted each
other's children.
"""

from __future__ import annotations

import logging
from typing import Any

import gymnasium as gym
import numpy as np
import ray

from pipeline.search import trial_state
from pipeline.search.records import ON_HEAD, RUNNER_CPUS, make_env

logger = logging.getLogger(__name__)


def random_episode(env: gym.Env, rng: np.random.Generator) -> float:
    """Plays one episode with uniformly random actions; returns its return."""
    env.reset(seed=int(rng.integers(2**31)))
    total, done = 0.0, False
    while not done:
        space = env.action_space
        if isinstance(space, gym.spaces.MultiDiscrete):
            action = rng.integers(0, space.nvec)
        elif isinstance(space, gym.spaces.Discrete):
            action = int(rng.integers(space.n))
        else:
            raise ValueError(f"random search cannot sample action space {space}")
        _, reward, terminated, truncated, _ = env.step(action)
        total += float(reward)
        done = terminated or truncated
    return total


def random_search(settings: dict[str, Any], env_config: dict[str, Any]) -> None:
    """Runs a random-search stage inside a Tune trial (see ``pipeline.search.trial.stage_trainable``).

    Iteration ``i`` draws its actions from a generator seeded with ``(seed, i)``, so a
    restored trial continues with the actions it would have taken.
    """
    start, best = trial_state.restore()
    per_iteration = settings["episodes_per_iteration"]
    cpus = settings.get("runner_cpus", RUNNER_CPUS)
    workers = [
        EnvWorker.options(num_cpus=cpus, resources=ON_HEAD).remote(settings["stage"], env_config)
        for _ in range(random_workers(settings))
    ]
    try:
        for iteration in range(start + 1, settings["iterations"] + 1):
            seeds = np.random.SeedSequence([settings["seed"], iteration]).spawn(per_iteration)
            # Worker w plays seeds w, w + n, ...; only the returns' mean, max and min are used.
            chunks = ray.get(
                [w.play.remote(seeds[i :: len(workers)]) for i, w in enumerate(workers)]
            )
            returns = [r for chunk in chunks for r in chunk]
            best = max(best, max(returns))
            metrics = {
                "iteration": iteration,
                "iterations_total": settings["iterations"],
                "episodes": len(returns),
                "episodes_expected": per_iteration,
                "reward_mean": float(np.mean(returns)),
                "reward_max": float(np.max(returns)),
                "reward_min": float(np.min(returns)),
                "best_reward": best,
            }
            trial_state.report(metrics, iteration, best)
    finally:
        for worker in workers:
            ray.kill(worker)


def random_workers(settings: dict[str, Any]) -> int:
    """Env workers of a random-search stage: ``env_runners``, at most one per episode."""
    return max(1, min(settings["env_runners"], settings["episodes_per_iteration"]))


@ray.remote(num_cpus=0)
class EnvWorker:
    """One env in its own process, playing random episodes (an RLlib env runner's part)."""

    def __init__(self, stage: str, env_config: dict[str, Any]) -> None:
        self.env = make_env(stage, env_config)

    def play(self, seeds: list[np.random.SeedSequence]) -> list[float]:
        """One episode per seed, in order; their returns."""
        return [random_episode(self.env, np.random.default_rng(s)) for s in seeds]
