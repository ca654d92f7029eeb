"""Multi-fidelity child evaluation: stop a child early once it cannot reach the top-k.

A child's validation accuracy is measured at a few checkpoints of its KD budget. From the
curve so far, :func:`accuracy_upper_bound` bounds the accuracy the full budget could reach;
if even that accuracy would give a reward below the k-th best reward of the children already
trained in full, :func:`should_stop` says stop. Its last measured accuracy is then recorded
as a lower bound of the full-budget one.

The one assumption: **a child's validation accuracy, as a function of the KD step, is
non-decreasing and concave** (it rises, ever more slowly). Under it the rule never stops a
child that a full evaluation would put in the top-k: the bound is a true upper bound, the
reward is non-decreasing in accuracy, and the k-th best full reward only grows as children
finish, so a stopped child's full reward is below the final k-th best. Real curves are noisy
and a learning-rate schedule that decays late (cosine) can lift the end of a curve; ``slack``
absorbs some of that, and a constant schedule (the search default) suits the assumption best.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from envs.evaluation import ChildResult
from pipeline.children.cache import call

logger = logging.getLogger(__name__)

Curve = Sequence[tuple[int, float]]
"""Measured ``(step, validation accuracy)`` pairs, in increasing step order."""


@dataclass(frozen=True)
class EarlyStop:
    """When to measure a child during its training, and how cautiously to stop it."""

    checkpoints: tuple[float, ...] = (0.25, 0.5)
    """Fractions of the KD steps, each in (0, 1), after which validation accuracy is measured.
    A stop needs two points for a finite bound (one point bounds accuracy only by 1.0)."""
    top_k: int = 3
    """Children kept safe: those a full evaluation would rank among the best ``top_k``."""
    slack: float = 0.01
    """Accuracy added to the extrapolated bound, against measurement noise."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoints", tuple(sorted(float(f) for f in self.checkpoints)))
        if not self.checkpoints or not all(0.0 < f < 1.0 for f in self.checkpoints):
            raise ValueError(
                f"early-stop checkpoints {list(self.checkpoints)} must be fractions of the "
                "KD steps in (0, 1), at least one"
            )
        if self.top_k < 1:
            raise ValueError(f"early-stop top_k {self.top_k!r} must be >= 1")
        if not self.slack >= 0.0:
            raise ValueError(f"early-stop slack {self.slack!r} must be >= 0 accuracy points")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | EarlyStop) -> EarlyStop:
        """Builds the settings from keyword values, naming any unknown key."""
        if isinstance(values, EarlyStop):
            return values
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown early-stop settings {unknown}; known ones are {sorted(known)}"
            )
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return {"checkpoints": list(self.checkpoints), "top_k": self.top_k, "slack": self.slack}

    def checkpoint_steps(self, total_steps: int) -> list[int]:
        """The distinct step numbers in ``[1, total_steps)`` the checkpoints fall on."""
        steps = {round(f * total_steps) for f in self.checkpoints}
        return sorted(s for s in steps if 1 <= s < total_steps)


def accuracy_upper_bound(curve: Curve, total_steps: int, slack: float = 0.0) -> float:
    """The highest accuracy the full ``total_steps`` can reach, given the curve so far.

    Assumes the learning curve is non-decreasing and concave in steps: then no later slope
    exceeds the slope between the last two measured points, so the straight line through
    them, extended to ``total_steps``, lies above the rest of the curve. The result is that
    extrapolation (never below the last point) plus ``slack``, at most 1.0. With fewer than
    two points nothing bounds the curve but 1.0.
    """
    if len(curve) < 2:
        return 1.0
    (s1, a1), (s2, a2) = curve[-2], curve[-1]
    if s2 <= s1:
        raise ValueError(f"curve steps must increase, got {s1} then {s2}")
    slope = max(0.0, (a2 - a1) / (s2 - s1))
    return min(1.0, a2 + slope * max(0, total_steps - s2) + slack)


def should_stop(
    curve: Curve,
    total_steps: int,
    reward_at: Callable[[float], float],
    kth_best: float | None,
    settings: EarlyStop,
) -> bool:
    """True when even the accuracy bound gives a reward below the k-th best full reward.

    Args:
        curve: the child's measured ``(step, accuracy)`` points so far.
        total_steps: the child's full KD budget.
        reward_at: the child's reward at a given accuracy (non-decreasing in it).
        kth_best: the k-th best reward among children trained in full, or None while fewer
            than k have finished (then nothing is stopped).
        settings: the slack added to the bound.
    """
    if kth_best is None or not curve:
        return False
    bound = accuracy_upper_bound(curve, total_steps, settings.slack)
    return reward_at(bound) < kth_best


@dataclass(frozen=True)
class StopPlan:
    """What one child's task needs for early stopping; pickles into the Ray task."""

    settings: EarlyStop
    leaderboard: Any
    """The reward cache: a :class:`RewardCache` in local mode, else its actor handle."""
    reward_at: Callable[..., float]
    """The child's reward at a given accuracy (``envs.evaluation.Child.reward_at``)."""
    key: str
    """The child's architecture hash: one leaderboard entry per architecture."""

    def kth_best(self) -> float | None:
        return call(self.leaderboard, "kth_best", self.settings.top_k)

    def offer_result(self, result: ChildResult) -> None:
        """Enters a full-budget result's reward into the leaderboard; never raises."""
        try:
            if result.latency_s is None:
                reward = self.reward_at(result.accuracy)
            else:
                reward = self.reward_at(result.accuracy, latency_s=result.latency_s)
            call(self.leaderboard, "offer", reward, self.key)
        except Exception as err:  # a lost leaderboard only means less stopping
            logger.warning("could not offer child %s to the leaderboard: %s", self.key, err)


class CheckpointRule:
    """The ``on_checkpoint`` callback of one child: stops it when it cannot reach the top-k."""

    def __init__(self, plan: StopPlan, total_steps: int) -> None:
        self.plan, self.total_steps = plan, total_steps
        self.steps = plan.settings.checkpoint_steps(total_steps)
        self.curve: list[tuple[int, float]] = []
        self.kth_best: float | None = None

    def __call__(self, step: int, accuracy: float) -> bool:
        self.curve.append((step, accuracy))
        try:
            self.kth_best = self.plan.kth_best()
            return should_stop(
                self.curve, self.total_steps, self.plan.reward_at, self.kth_best, self.plan.settings
            )
        except Exception as err:  # e.g. a latency budget, unknown before training ends
            logger.warning("child %s not stopped at step %d: %s", self.plan.key, step, err)
            return False

    def record(self, stopped: bool) -> dict[str, Any]:
        """The ``ChildResult.extra`` entries that say how the child's training ended."""
        curve = [[s, a] for s, a in self.curve]
        if not stopped:
            return {"early_stopped": False, "curve": curve}
        bound = accuracy_upper_bound(self.curve, self.total_steps, self.plan.settings.slack)
        return {
            "early_stopped": True,
            "reward_bound": "lower",
            "curve": curve,
            "accuracy_upper_bound": bound,
            "kth_best": self.kth_best,
        }
