"""Random search: the baseline an RL search must beat (``--algo random``).

It samples uniformly from the same action space as the RL policy and evaluates the same
number of children (``iterations * episodes_per_iteration``), through the same env, recorder
and evaluator, reporting to Tune per iteration exactly like an RLlib stage trial. Children in
one iteration run in ``env_runners`` threads, each waiting on its child's evaluation, so the
evaluations in flight match the RL search's.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import gymnasium as gym
import numpy as np

from pipeline.search import trial_state
from pipeline.search.records import make_env

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
    workers = max(1, min(settings["env_runners"], per_iteration))
    envs = [make_env(settings["stage"], env_config) for _ in range(workers)]
    try:
        with ThreadPoolExecutor(workers) as pool:
            for iteration in range(start + 1, settings["iterations"] + 1):
                seeds = np.random.SeedSequence([settings["seed"], iteration]).spawn(per_iteration)
                returns = _parallel(envs, seeds, pool)
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
        for env in envs:
            env.close()


def _parallel(
    envs: list[gym.Env], seeds: list[np.random.SeedSequence], pool: ThreadPoolExecutor
) -> list[float]:
    """Plays one episode per seed, each env running one episode at a time."""

    def run(worker: int) -> list[float]:
        mine = seeds[worker :: len(envs)]
        return [random_episode(envs[worker], np.random.default_rng(s)) for s in mine]

    chunks = list(pool.map(run, range(len(envs))))
    return [r for chunk in chunks for r in chunk]
