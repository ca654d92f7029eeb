"""Every child a search evaluates, recorded: the stage envs wrapped so that each child lands
in the run's :class:`ChildLog` actor, which the driver drains after each reported iteration
(``pipeline.tracking.progress``) into ``children.csv``. The envs themselves know nothing of
this (``envs`` never imports ``pipeline``).

The search's own processes (the trial, its env runners, the child log, the reward cache) live
on Ray's head node (:data:`ON_HEAD`), so that a lost worker node costs children, which the
evaluator retries, never the search itself.
"""

from __future__ import annotations

import logging
from typing import Any

import gymnasium as gym
import ray

from envs.env import RemovalEnv, ShrinkageEnv

logger = logging.getLogger(__name__)

STAGES = ("removal", "shrinkage")
ENV_CLASSES = {"removal": RemovalEnv, "shrinkage": ShrinkageEnv}
LOG_KEY, TRIAL_KEY = "n2n_child_log", "n2n_trial_id"
"""env_config keys the recorder takes out before the env sees the config."""
LOG_NAMESPACE = "n2n"
RUNNER_CPUS = 0.25
"""CPU reserved per env runner and for the trial's main process: they wait, children work."""
ON_HEAD_KEY = "node:__internal_head__"
ON_HEAD = {ON_HEAD_KEY: 0.001}
"""Custom resource that only Ray's head node has (Ray Train pins its state actor with it). The
trial's main process and its env runners request it, so they live on the head with the driver
and only child tasks go to worker nodes: a lost worker node costs children, which the evaluator
retries, never the search itself. They reserve ``RUNNER_CPUS`` each where the head has that
many CPUs, and none on a head started with ``num-cpus: 0`` (the chart's: there only the driver
and the search run on the head), see :func:`runner_cpus`."""


def runner_cpus(env_runners: int) -> float:
    """CPUs each of a trial's processes (main + env runners) reserves on the head node.

    ``RUNNER_CPUS`` when the head can hold them all, so that children (which may also run on
    the head of a local cluster) do not oversubscribe it; 0 on a head with too few CPUs (a
    KubeRay head with ``num-cpus: 0`` takes no Ray work but the search's, so nothing competes).
    Before Ray starts (a dry config), ``RUNNER_CPUS``.
    """
    if not ray.is_initialized():
        return RUNNER_CPUS
    heads = [n for n in ray.nodes() if n.get("Alive") and ON_HEAD_KEY in n.get("Resources", {})]
    cpus = heads[0]["Resources"].get("CPU", 0.0) if heads else 0.0
    return RUNNER_CPUS if cpus + 1e-9 >= RUNNER_CPUS * (env_runners + 1) else 0.0


@ray.remote(num_cpus=0)
class ChildLog:
    """Collects child records from env runners, per Tune trial, until the driver drains them."""

    def __init__(self) -> None:
        self._rows: dict[str, list[dict[str, Any]]] = {}

    def append(self, trial_id: str, row: dict[str, Any]) -> None:
        self._rows.setdefault(trial_id, []).append(row)

    def drain(self, trial_id: str | None = None) -> list[dict[str, Any]]:
        """Returns and forgets the records of one trial (or of all trials)."""
        if trial_id is not None:
            return self._rows.pop(trial_id, [])
        rows = [r for rs in self._rows.values() for r in rs]
        self._rows.clear()
        return rows


def child_log(name: str) -> ray.actor.ActorHandle:
    """The named :class:`ChildLog` of a run, created if absent (owned by the caller).

    It lives on the head node: a record must outlive any worker node.
    """
    return ChildLog.options(
        name=name, namespace=LOG_NAMESPACE, get_if_exists=True, resources=ON_HEAD
    ).remote()


def child_row(info: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able record of one evaluated child, from the env's step ``info``."""
    keys = (
        "stage", "action", "arch_hash", "params", "flops", "size_bytes", "compression", "accuracy",
        "reward", "wall_time_s", "cache_hit", "error", "kd_steps", "removed", "dropped", "ratios",
        "spec",
    )  # fmt: skip
    row = {k: info.get(k) for k in keys}
    # Stopped early by pipeline.children.early_stop: accuracy and reward are then lower bounds.
    row["early_stopped"] = bool(info.get("extra_early_stopped", False))
    # Times the child's task was lost with its worker or node and run again (pipeline.children.evaluator).
    row["retries"] = int(info.get("extra_retries") or 0)
    row["action"] = [int(a) for a in (row["action"] or [])]
    for key in ("compression", "accuracy", "reward", "wall_time_s"):
        if row[key] is not None:
            row[key] = float(row[key])
    return row


class ChildRecorder(gym.Wrapper):
    """Sends every child the wrapped env evaluates to the run's :class:`ChildLog`."""

    def __init__(self, env: gym.Env, log_name: str, trial_id: str) -> None:
        super().__init__(env)
        self._log_name, self._trial_id = log_name, trial_id
        self._log: ray.actor.ActorHandle | None = None

    def step(self, action: Any):  # noqa: ANN201 (Gymnasium's 5-tuple)
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated and "reward" in info:
            try:
                if self._log is None:
                    self._log = ray.get_actor(self._log_name, namespace=LOG_NAMESPACE)
                # Synchronous: when an iteration returns, its children are in the log.
                ray.get(self._log.append.remote(self._trial_id, child_row(info)))
            except Exception as err:  # the driver went away: keep training, lose the record
                logger.warning("could not record child in %s: %s", self._log_name, err)
        return obs, reward, terminated, truncated, info


def make_env(stage: str, env_config: dict[str, Any]) -> gym.Env:
    """The stage's env, wrapped in a :class:`ChildRecorder` when the config names a log."""
    config = dict(env_config)
    log_name, trial_id = config.pop(LOG_KEY, None), config.pop(TRIAL_KEY, "")
    env = ENV_CLASSES[stage](config)
    return ChildRecorder(env, log_name, trial_id) if log_name else env


def register_envs() -> dict[str, str]:
    """Registers ``n2n-removal-recorded`` / ``n2n-shrinkage-recorded`` with RLlib."""
    from ray.tune.registry import register_env

    names = {}
    for stage in STAGES:
        names[stage] = f"n2n-{stage}-recorded"
        register_env(names[stage], lambda cfg, stage=stage: make_env(stage, cfg))
    return names
