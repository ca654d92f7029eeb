"""The two N2N environments: layer removal, then layer shrinkage.

Both take only an ``env_config`` dict (RLlib's convention) with these keys:

- ``teacher``: a checkpoint folder (spec.json + weights.pt), a student spec, or an
  architecture spec ``{"arch", "kwargs", "input_shape"}`` (random weights, for tests).
- ``evaluator``: an :class:`~envs.evaluation.Evaluator` or an import path
  ``"module:Class"`` built with ``evaluator_config``.
- ``reward``: ``{"name": "n2n"}`` (default) or ``{"name": "constrained", "budgets": {...}}``.
- ``teacher_accuracy``: overrides the evaluator's teacher accuracy.
- ``teacher_latency_s``: the teacher's latency, for a latency budget.

Shrinkage also reads ``ratios`` (keep-ratios to choose from, default 0.1 ... 1.0),
``min_channels`` (default 4), ``importance`` (``"l1"`` or ``"bn"``), ``sequential``
(one unit per step, so a recurrent policy sees its earlier choices) and ``start`` (the
network to shrink: a checkpoint folder or student spec, default the teacher) and ``limits``
(``{"params": N, "flops": F}``: an action whose child would exceed them is capped until it
fits; ``info["action"]`` is the action taken).

Removal reads ``limits`` too (with ``ratios``, ``min_channels`` and ``importance``): a removal
child over them is shrunk uniformly, every shrinkable unit to the highest keep-ratio in
``ratios`` whose child fits (``info["ratios"]``), so that under a budget each removal is scored
by what it leaves at the budget instead of only by how far over it the child is.

An episode yields one child network. The observation is the parent's unit descriptors
(``envs.graph.FEATURES``): a float32 Box ``[units, features]`` in [0, 1] whose
``removable`` / ``shrinkable`` columns mark the units the action addresses and, in
sequential shrinkage, whose ``keep_ratio`` / ``cursor`` columns show the choices so far.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import random
from collections.abc import Iterator
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from envs.channels import DEFAULT_RATIOS, IMPORTANCE, validate_ratio
from envs.checkpoint import load_network
from envs.costs import fits, highest_level, model_costs
from envs.evaluation import Child, ChildResult, load_evaluator
from envs.graph import COL
from envs.rewards import FAILED_REWARD, ChildScore, RewardFn, make_reward
from envs.spec import arch_hash
from envs.surgery import analyze, make_child

log = logging.getLogger(__name__)

_KNOWN_KEYS = {
    "teacher", "evaluator", "evaluator_config", "reward", "teacher_accuracy", "teacher_latency_s",
    "ratios", "min_channels", "importance", "sequential", "start", "stage", "limits",
}  # fmt: skip


def reward_at(
    reward_fn: RewardFn, template: ChildScore, accuracy: float, latency_s: float | None = None
) -> float:
    """The reward of the child ``template`` describes at ``accuracy`` (and measured latency).

    Bound with ``functools.partial`` to a child's reward and costs, it is the child's
    ``Child.reward_at``: a plain module-level function, so it pickles into a Ray task.
    """
    changes: dict[str, Any] = {"accuracy": float(accuracy)}
    if latency_s is not None:
        changes["latency_s"] = latency_s
    return float(reward_fn(dataclasses.replace(template, **changes)))


@contextlib.contextmanager
def caller_random_state() -> Iterator[None]:
    """Restores Python's, NumPy's and PyTorch's (CPU) global random state on exit."""
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


class _ChildEnv(gym.Env):
    """What both stages share: the teacher, the evaluator, the reward and child scoring."""

    metadata: dict[str, Any] = {"render_modes": []}
    stage = ""

    def __init__(self, env_config: dict[str, Any] | None = None) -> None:
        config = dict(env_config or {})
        unknown = set(config) - _KNOWN_KEYS
        if unknown:
            raise ValueError(
                f"unknown env_config keys {sorted(unknown)}; known keys are {sorted(_KNOWN_KEYS)}"
            )
        if "teacher" not in config or "evaluator" not in config:
            raise ValueError(
                "env_config needs 'teacher' (checkpoint folder or spec) and 'evaluator'"
            )
        self.config = config
        self.teacher, self.teacher_spec = load_network(config["teacher"])
        self.input_shape = tuple(self.teacher_spec["base"]["input_shape"])
        self.teacher_costs = model_costs(self.teacher, self.input_shape)
        self.evaluator = load_evaluator(config["evaluator"], config.get("evaluator_config"))
        self.reward_fn = make_reward(config.get("reward"))
        accuracy = config.get("teacher_accuracy")
        self.teacher_accuracy = float(
            accuracy if accuracy is not None else self.evaluator.teacher_accuracy
        )
        if not 0 < self.teacher_accuracy <= 1:
            raise ValueError(f"teacher accuracy {self.teacher_accuracy} must be in (0, 1]")
        self.teacher_latency_s = config.get("teacher_latency_s")
        self.ratios = tuple(
            validate_ratio(r, "ratio in 'ratios'") for r in config.get("ratios", DEFAULT_RATIOS)
        )
        if not self.ratios:
            raise ValueError("'ratios' is empty: give keep-ratios such as [0.25, 0.5, 1.0]")
        self.min_channels = int(config.get("min_channels", 4))
        if self.min_channels < 1:
            raise ValueError(f"min_channels {self.min_channels} must be >= 1")
        self.importance = config.get("importance", "l1")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance {self.importance!r} is not one of {list(IMPORTANCE)}")
        self.limits = {k: int(v) for k, v in (config.get("limits") or {}).items()}
        unknown = set(self.limits) - {"params", "flops"}
        if unknown:
            raise ValueError(f"limits {sorted(unknown)} unknown: give 'params' and/or 'flops'")

    def _score(
        self, build: Any, action: list[int], extra: dict[str, Any]
    ) -> tuple[float, dict[str, Any]]:
        """Builds a child with ``build()``, evaluates it and returns (reward, info).

        The caller's random state is left as it was (:func:`caller_random_state`): building a
        child initialises layers before the teacher's weights are copied in, a model built
        once is cached afterwards, and a local evaluator seeds its training, so otherwise
        the draws of the policy sampling the next action would depend on what this process
        happened to build before.
        """
        with caller_random_state():
            return self._build_and_score(build, action, extra)

    def _build_and_score(
        self, build: Any, action: list[int], extra: dict[str, Any]
    ) -> tuple[float, dict[str, Any]]:
        info: dict[str, Any] = {"stage": self.stage, "action": action, **extra}
        try:
            model, spec = build()
            costs = model_costs(model, self.input_shape)
            child = Child(
                model,
                spec,
                arch_hash(spec),
                costs.params,
                costs.flops,
                costs.size_bytes,
                self.stage,
                reward_at=functools.partial(reward_at, self.reward_fn, self._template(costs)),
            )
            info.update(spec=spec, arch_hash=child.arch_hash, **costs.as_dict())
            info["compression"] = 1.0 - costs.params / self.teacher_costs.params
            result = self.evaluator.evaluate(child)
        except Exception as err:  # surgery or a misbehaving evaluator: the child failed
            log.warning("child failed: %s: %s", type(err).__name__, err)
            result = ChildResult(error=f"{type(err).__name__}: {err}")
        info.update(
            accuracy=result.accuracy,
            error=result.error,
            cache_hit=result.cache_hit,
            kd_steps=result.kd_steps,
            latency_s=result.latency_s,
            wall_time_s=result.wall_time_s,
            **{f"extra_{k}": v for k, v in result.extra.items()},
        )
        if result.failed:
            info["error"] = result.error or f"evaluator returned accuracy {result.accuracy!r}"
            info["reward"] = FAILED_REWARD
            return FAILED_REWARD, info
        score = dataclasses.replace(
            self._template(costs), accuracy=float(result.accuracy), latency_s=result.latency_s
        )
        try:
            reward = float(self.reward_fn(score))
        except ValueError as err:
            info["error"] = f"ValueError: {err}"
            reward = FAILED_REWARD
        info["reward"] = reward
        return reward, info

    def _template(self, costs: Any) -> ChildScore:
        """What the reward sees of a child with ``costs``, before its accuracy is known."""
        return ChildScore(
            accuracy=0.0,
            teacher_accuracy=self.teacher_accuracy,
            params=costs.params,
            teacher_params=self.teacher_costs.params,
            flops=costs.flops,
            teacher_flops=self.teacher_costs.flops,
            teacher_latency_s=self.teacher_latency_s,
        )

    @staticmethod
    def _check_action(action: Any, nvec: np.ndarray, what: str) -> list[int]:
        values = np.asarray(action).reshape(-1)
        if values.shape[0] != len(nvec):
            raise ValueError(
                f"action has length {values.shape[0]} but this environment expects {len(nvec)} ({what})"
            )
        for i, (v, n) in enumerate(zip(values, nvec, strict=True)):
            if not (float(v).is_integer() and 0 <= v < n):
                shown = int(v) if float(v).is_integer() else float(v)
                raise ValueError(
                    f"action[{i}] = {shown} is out of range: it must be an integer in [0, {n - 1}]"
                )
        return [int(v) for v in values]


class RemovalEnv(_ChildEnv):
    """Stage 1: one action decides, for every removable unit, keep (0) or remove (1).

    A child is never larger than the teacher, so its N2N reward ``C(2-C) A/A_teacher`` is
    never negative and stays above a failed child's -1: removals that would make the network
    grow (a channel-narrowing unit whose consumer would be widened by more weights than the
    unit holds, such as a MobileNetV2 projection conv) are left out of the requested set,
    deterministically (``envs.surgery.remove_without_growth``). ``info["removed"]`` lists the
    removals made and ``info["dropped"]`` those left out. The mask (the ``removable`` column)
    still offers such units: removed together with their consumer they shrink the network.
    """

    stage = "removal"

    def __init__(self, env_config: dict[str, Any] | None = None) -> None:
        super().__init__(env_config)
        self.architecture = analyze(self.teacher, self.input_shape)
        self.units = [u.name for u in self.architecture.removable]
        if not self.units:
            raise ValueError("the teacher has no removable unit; skip the removal stage")
        self._obs = self.architecture.descriptors()
        self.observation_space = gym.spaces.Box(0.0, 1.0, self._obs.shape, np.float32)
        self.action_space = gym.spaces.MultiDiscrete([2] * len(self.units))

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        return self._obs.copy(), {}

    def step(self, action: Any):
        values = self._check_action(action, self.action_space.nvec, "one 0/1 per removable unit")
        requested = [u for u, v in zip(self.units, values, strict=True) if v == 1]
        extra: dict[str, Any] = {"removed": requested, "dropped": []}
        reward, info = self._score(lambda: self._child(requested, extra), values, extra)
        if "ratios" in extra:  # set while building, after _score copied ``extra``
            info["ratios"] = extra["ratios"]
        if info.get("spec") is not None:
            made = set(info["spec"]["removed"])
            info["removed"] = [u for u in requested if u in made]
            info["dropped"] = [u for u in requested if u not in made]
        return self._obs.copy(), reward, True, False, info

    def _child(self, requested: list[str], info: dict[str, Any]) -> tuple[nn.Module, dict]:
        """The removal child; with ``limits``, shrunk uniformly to fit them when it does not
        (the keep-ratio per unit goes to ``info["ratios"]``)."""
        child, spec = make_child(self.teacher, self.teacher_spec, remove=requested)
        if not self.limits or fits(child, self.input_shape, self.limits):
            return child, spec
        units = [u.name for u in analyze(child, self.input_shape).shrinkable]
        built: dict[int, tuple[nn.Module, dict[str, Any]]] = {}

        def at(level: int) -> tuple[nn.Module, dict[str, Any]]:
            if level not in built:
                built[level] = make_child(
                    child, spec, ratios=dict.fromkeys(units, self.ratios[level]),
                    min_channels=self.min_channels, importance=self.importance,
                )  # fmt: skip
            return built[level]

        # The lowest level when none fits: the child is then over budget and its reward says so.
        low = highest_level(
            lambda i: fits(at(i)[0], self.input_shape, self.limits), len(self.ratios) - 1
        )
        info["ratios"] = dict.fromkeys(units, self.ratios[low])
        return at(low)


class ShrinkageEnv(_ChildEnv):
    """Stage 2: a keep-ratio index per shrinkable unit, all at once or one unit per step."""

    stage = "shrinkage"

    def __init__(self, env_config: dict[str, Any] | None = None) -> None:
        super().__init__(env_config)
        config = self.config
        self.sequential = bool(config.get("sequential", False))
        if config.get("start") is not None:
            self.parent, self.parent_spec = load_network(config["start"], "start")
        else:
            self.parent, self.parent_spec = self.teacher, self.teacher_spec
        self.architecture = analyze(self.parent, self.input_shape)
        self.units = [u.name for u in self.architecture.shrinkable]
        if not self.units:
            raise ValueError("the network has no shrinkable unit; skip the shrinkage stage")
        self._rows = [i for i, u in enumerate(self.architecture.units) if u.shrinkable]
        self._base_obs = self.architecture.descriptors()
        self.observation_space = gym.spaces.Box(0.0, 1.0, self._base_obs.shape, np.float32)
        n = len(self.ratios)
        self.action_space = (
            gym.spaces.Discrete(n)
            if self.sequential
            else gym.spaces.MultiDiscrete([n] * len(self.units))
        )
        self._choices: list[int] = []
        self._checked: tuple[tuple[int, ...], tuple[nn.Module, dict[str, Any]]] | None = None

    def _observation(self) -> np.ndarray:
        obs = self._base_obs.copy()
        for row, choice in zip(self._rows, self._choices, strict=False):
            obs[row, COL["keep_ratio"]] = self.ratios[choice]
        if self.sequential and len(self._choices) < len(self._rows):
            obs[self._rows[len(self._choices)], COL["cursor"]] = 1.0
        return obs

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._choices = []
        return self._observation(), {}

    def step(self, action: Any):
        if self.sequential:
            if len(self._choices) >= len(self.units):
                raise ValueError("the episode is over: call reset() before step()")
            self._choices += self._check_action(
                action, np.array([len(self.ratios)]), "one ratio index"
            )
            if len(self._choices) < len(self.units):
                return self._observation(), 0.0, False, False, {"stage": self.stage}
            values = list(self._choices)
        else:
            values = self._check_action(
                action, self.action_space.nvec, "one ratio index per shrinkable unit"
            )
            self._choices = values
        if self.limits:
            with caller_random_state():
                values = self._within_limits(values)
        ratios = {u: self.ratios[v] for u, v in zip(self.units, values, strict=True)}
        reward, info = self._score(lambda: self._child(values), values, {"ratios": ratios})
        return self._observation(), reward, True, False, info

    def _child(self, values: list[int]) -> tuple[nn.Module, dict[str, Any]]:
        # The child the budget check built last is handed over once, not built again.
        checked, self._checked = self._checked, None
        if checked is not None and checked[0] == tuple(values):
            return checked[1]
        ratios = {u: self.ratios[v] for u, v in zip(self.units, values, strict=True)}
        return make_child(
            self.parent,
            self.parent_spec,
            ratios=ratios,
            min_channels=self.min_channels,
            importance=self.importance,
        )

    def _fits(self, values: list[int]) -> bool:
        built = self._child(values)
        self._checked = (tuple(values), built)
        return fits(built[0], self.input_shape, self.limits)

    def _within_limits(self, values: list[int]) -> list[int]:
        """The action capped so that its child fits ``limits`` (AMC's constrained action
        space): every unit's ratio index is lowered to at most a common level, the highest
        level whose child fits, found by bisection (a few surgeries, no training). Units
        already below the level keep the policy's choice; when even the lowest ratios do not
        fit, the lowest are taken (the child is then over budget and its reward says so).
        """
        try:
            if self._fits(values):
                return values
        except Exception:  # noqa: BLE001 (a surgery error: scored as the failed child it is)
            return values
        # The level max(values) does not fit.
        low = highest_level(
            lambda level: self._fits([min(v, level) for v in values]), max(values) - 1
        )
        return [min(v, low) for v in values]


def register(prefix: str = "n2n") -> tuple[str, str]:
    """Registers both envs with Ray Tune's registry as ``n2n-removal`` / ``n2n-shrinkage``."""
    from ray.tune.registry import register_env

    register_env(f"{prefix}-removal", lambda cfg: RemovalEnv(dict(cfg)))
    register_env(f"{prefix}-shrinkage", lambda cfg: ShrinkageEnv(dict(cfg)))
    return f"{prefix}-removal", f"{prefix}-shrinkage"
