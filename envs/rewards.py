"""Rewards as pure functions, chosen by name.

N2N (Ashok et al., ICLR 2018) scores a child by ``R = C(2 - C) * A / A_teacher`` with
compression ``C = 1 - params_student / params_teacher``. ``C(2-C)`` rises steeply for
small compression and flattens near 1, so accuracy dominates once a student is small.
The constrained variant adds hard budgets (parameters, FLOPs or latency, as fractions of the
teacher); a child over budget is penalised with N2N's softening schedule: its reward is
multiplied by ``(budget / used) ** softness`` instead of being cut to the floor, which keeps a
gradient towards the feasible region early in the search. The budget variant aims at what a
user asks for, the most accurate student within a budget: within it only accuracy counts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

FAILED_REWARD = -1.0
"""Reward of a child that could not be built, trained or measured."""

BUDGET_KEYS = ("params", "flops", "latency")


@dataclass(frozen=True)
class ChildScore:
    """What the reward sees of one child, relative to its teacher."""

    accuracy: float
    teacher_accuracy: float
    params: int
    teacher_params: int
    flops: int = 0
    teacher_flops: int = 0
    latency_s: float | None = None
    teacher_latency_s: float | None = None

    @property
    def compression(self) -> float:
        """``C = 1 - params_student / params_teacher``."""
        return 1.0 - self.params / self.teacher_params

    def used(self, key: str) -> float | None:
        """Fraction of the teacher's cost used, for a budget key."""
        if key == "params":
            return self.params / self.teacher_params
        if key == "flops":
            return self.flops / self.teacher_flops if self.teacher_flops else None
        if self.latency_s is None or not self.teacher_latency_s:
            return None
        return self.latency_s / self.teacher_latency_s


def n2n_reward(score: ChildScore) -> float:
    """N2N's reward ``C(2-C) * A/A_teacher``."""
    if score.teacher_accuracy <= 0:
        raise ValueError(f"teacher accuracy {score.teacher_accuracy} must be > 0")
    c = score.compression
    return c * (2.0 - c) * score.accuracy / score.teacher_accuracy


@dataclass(frozen=True)
class ConstrainedReward:
    """N2N reward with budgets, as fractions of the teacher's cost (e.g. ``{"flops": 0.25}``)."""

    budgets: Mapping[str, float] = field(default_factory=dict)
    """Largest allowed fraction of the teacher's params / FLOPs / latency."""
    softness: float = 2.0
    """Exponent of the softening factor ``(budget / used) ** softness`` for a child over budget."""

    def __post_init__(self) -> None:
        for key, value in self.budgets.items():
            if key not in BUDGET_KEYS:
                raise ValueError(f"unknown budget {key!r}: use one of {list(BUDGET_KEYS)}")
            if not 0 < value <= 1:
                raise ValueError(
                    f"budget {key}={value} must be a fraction of the teacher in (0, 1]"
                )
        if self.softness <= 0:
            raise ValueError(f"softness {self.softness} must be > 0")

    def __call__(self, score: ChildScore) -> float:
        reward = n2n_reward(score)
        for key, budget in self.budgets.items():
            used = score.used(key)
            if used is None:
                raise ValueError(f"a {key} budget needs the child's measured {key}")
            if used > budget:
                factor = (budget / used) ** self.softness
                reward = reward * factor if reward > 0 else reward - (1 - factor)
        return max(reward, FAILED_REWARD)


@dataclass(frozen=True)
class BudgetReward:
    """The most accurate child within a budget: ``A / A_teacher`` for a child within it, so that
    the search aims at the largest (most accurate) student that fits rather than at ever more
    compression; a child over budget is softened by ``(budget / used) ** softness`` and loses
    ``penalty``, so it scores below a child of equal accuracy that fits."""

    budgets: Mapping[str, float] = field(default_factory=dict)
    """Largest allowed fraction of the teacher's params / FLOPs / latency."""
    softness: float = 2.0
    penalty: float = 0.1

    def __post_init__(self) -> None:
        ConstrainedReward(self.budgets, self.softness)  # the same checks
        if not self.budgets:
            raise ValueError("a budget reward needs at least one budget, e.g. {'params': 0.1}")
        if self.penalty < 0:
            raise ValueError(f"penalty {self.penalty} must be >= 0")

    def __call__(self, score: ChildScore) -> float:
        if score.teacher_accuracy <= 0:
            raise ValueError(f"teacher accuracy {score.teacher_accuracy} must be > 0")
        reward, over = score.accuracy / score.teacher_accuracy, False
        for key, budget in self.budgets.items():
            used = score.used(key)
            if used is None:
                raise ValueError(f"a {key} budget needs the child's measured {key}")
            if used > budget:
                reward, over = reward * (budget / used) ** self.softness, True
        return max(reward - self.penalty if over else reward, FAILED_REWARD)


RewardFn = Callable[[ChildScore], float]
REWARDS = {"n2n": lambda **_: n2n_reward, "constrained": ConstrainedReward, "budget": BudgetReward}


def make_reward(config: Mapping[str, Any] | None) -> RewardFn:
    """Builds a reward from ``{"name": "n2n"}`` or ``{"name": "constrained", "budgets": {...}}``."""
    config = dict(config or {"name": "n2n"})
    name = config.pop("name", "n2n")
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}: use one of {sorted(REWARDS)}")
    return REWARDS[name](**config)
