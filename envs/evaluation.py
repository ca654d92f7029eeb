"""The contract between the environments and whatever scores a child network.

The environments build a child by surgery and hand it to an *evaluator*, injected through
``env_config`` as an object or an import path, so that the same env runs with the real
knowledge-distillation evaluator on a Ray cluster (``pipeline.children.evaluator``) or with a fast
synthetic one in tests. ``envs`` never imports ``pipeline``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import nn


@dataclass
class Child:
    """A candidate student, built from the teacher by surgery, not yet trained."""

    model: nn.Module
    """The network, holding the teacher's surviving weights."""
    spec: dict[str, Any]
    """Its student spec (see ``envs.spec``)."""
    arch_hash: str
    """Canonical hash of ``spec``: equal for equal architectures."""
    params: int
    flops: int
    size_bytes: int
    stage: str = ""
    """``"removal"`` or ``"shrinkage"``: which search produced it."""
    reward_at: Callable[..., float] | None = None
    """The reward this child would get at a given validation accuracy, called as
    ``reward_at(accuracy)`` or ``reward_at(accuracy, latency_s=...)`` once its latency is
    measured; non-decreasing in accuracy, and picklable. It lets an evaluator stop a child
    whose reward cannot matter (see ``pipeline.children.early_stop``); None where the env did not set it."""


@dataclass
class ChildResult:
    """What an evaluator reports for one child. ``error`` set means the child failed."""

    accuracy: float | None = None
    """Validation accuracy in [0, 1] after the child's training, or None if it failed."""
    error: str | None = None
    """``"ErrorClass: message"`` when building, training or measuring the child failed."""
    wall_time_s: float = 0.0
    kd_steps: int = 0
    cache_hit: bool = False
    latency_s: float | None = None
    """Measured inference latency at batch size 1, when the evaluator measures it."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else worth recording (e.g. accuracy before training, batch-N latency)."""

    @property
    def failed(self) -> bool:
        return self.error is not None or self.accuracy is None or not math.isfinite(self.accuracy)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Evaluator(Protocol):
    """Scores child networks. Implementations must be picklable (RLlib ships env_config)."""

    @property
    def teacher_accuracy(self) -> float:
        """The teacher's accuracy on the same validation data the children are scored on."""
        ...

    def evaluate(self, child: Child) -> ChildResult:
        """Trains (if it trains) and scores one child; never raises for a bad child."""
        ...


def load_evaluator(spec: Any, config: dict[str, Any] | None = None) -> Evaluator:
    """Returns an evaluator from an instance, or an import path ``"module:Class"`` + kwargs."""
    if isinstance(spec, str):
        module_name, _, attr = spec.partition(":")
        if not attr:
            raise ValueError(f"evaluator {spec!r} must be an import path 'package.module:Class'")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot import evaluator {spec!r}: {err}") from err
        spec = factory(**(config or {}))
    if not isinstance(spec, Evaluator):
        raise ValueError(
            f"evaluator {spec!r} has no evaluate(child) method and teacher_accuracy attribute"
        )
    return spec


class SyntheticEvaluator:
    """A training-free evaluator whose accuracy is a known function of the architecture.

    Accuracy falls with the share of the teacher's parameters removed from "important" units
    and with compression past a knee, so the best reward sits at a known removal mask. It is
    for tests and search benchmarks (e.g. does PPO beat random search?), never for results.

    Args:
        important: module paths whose removal or shrinkage costs accuracy.
        teacher_accuracy: accuracy of the teacher and of any child that keeps all important units.
        penalty: accuracy lost per important unit removed.
        fail_on: module paths whose removal makes the evaluator report a failure (to test -1).
    """

    def __init__(
        self,
        important: list[str] | None = None,
        teacher_accuracy: float = 0.9,
        penalty: float = 0.3,
        fail_on: list[str] | None = None,
    ) -> None:
        self.important = set(important or [])
        self._teacher_accuracy = teacher_accuracy
        self.penalty = penalty
        self.fail_on = set(fail_on or [])
        self.calls = 0

    @property
    def teacher_accuracy(self) -> float:
        return self._teacher_accuracy

    def evaluate(self, child: Child) -> ChildResult:
        self.calls += 1
        removed = set(child.spec.get("removed", []))
        if removed & self.fail_on:
            return ChildResult(
                error=f"RuntimeError: synthetic failure for {sorted(removed & self.fail_on)}"
            )
        lost = len(removed & self.important) * self.penalty
        acc = max(0.0, self._teacher_accuracy - lost)
        return ChildResult(accuracy=acc)
