"""Figures a person looks at in the MLflow UI: the accuracy/size Pareto plot and reward curves.

Figures are built on :class:`matplotlib.figure.Figure` directly (no ``pyplot`` global state), so
they are safe to draw from a long-running process and need no display.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (params, accuracy) points no other point beats on both, sorted by params.

    A point is dominated when another has at most as many parameters and at least the same
    accuracy, and is strictly better in one of the two.
    """
    front: list[tuple[float, float]] = []
    best = -math.inf
    for params, accuracy in sorted(set(points), key=lambda p: (p[0], -p[1])):
        if accuracy > best:
            front.append((params, accuracy))
            best = accuracy
    return front


def pareto_figure(
    teacher: Mapping[str, Any],
    children: Sequence[Mapping[str, Any]],
    students: Sequence[Mapping[str, Any]] = (),
    baselines: Sequence[Mapping[str, Any]] = (),
) -> Figure:
    """Accuracy against parameter count for the teacher, every child, the students and baselines.

    Args:
        teacher: needs ``params`` and ``accuracy`` (test accuracy).
        children: child records with ``params``, ``accuracy`` and ``error``; failed children
            (an error, or no finite accuracy) are left out of the scatter.
        students: final students with ``params`` and ``accuracy`` (test accuracy), and an
            optional ``name`` used as the label.
        baselines: other compression methods run for comparison, with ``name``, ``params`` and
            ``accuracy``.
    """
    fig = Figure(figsize=(7, 4.5), dpi=110)
    ax = fig.add_subplot()
    ok = [
        (float(c["params"]), float(c["accuracy"]))
        for c in children
        if not c.get("error") and _finite(c.get("accuracy")) and _finite(c.get("params"))
    ]
    if ok:
        ax.scatter(*zip(*ok, strict=True), s=12, alpha=0.35, color="tab:blue", label="children")
        front = pareto_front(ok)
        ax.plot(*zip(*front, strict=True), color="tab:blue", lw=1, label="children Pareto front")
    for i, student in enumerate(students):
        if _finite(student.get("params")) and _finite(student.get("accuracy")):
            ax.scatter(
                student["params"], student["accuracy"], marker="*", s=160, color="tab:red",
                edgecolor="black", zorder=3, label="students" if i == 0 else None,
            )  # fmt: skip
            ax.annotate(str(student.get("name", f"#{i + 1}")), (student["params"], student["accuracy"]),
                        textcoords="offset points", xytext=(6, 4), fontsize=8)  # fmt: skip
    for baseline in baselines:
        if _finite(baseline.get("params")) and _finite(baseline.get("accuracy")):
            ax.scatter(baseline["params"], baseline["accuracy"], marker="D", s=50, zorder=3,
                       label=f"baseline: {baseline.get('name', '?')}")  # fmt: skip
    if _finite(teacher.get("params")) and _finite(teacher.get("accuracy")):
        ax.scatter(teacher["params"], teacher["accuracy"], marker="s", s=90, color="black",
                   zorder=3, label="teacher")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy vs parameters (children: validation after KD; others: test)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def reward_curve_figure(stage: str, iterations: Sequence[Mapping[str, Any]]) -> Figure:
    """Reward mean with its min-max band per search iteration of one stage.

    Args:
        stage: the stage's name, for the title.
        iterations: one mapping per iteration with ``step`` and ``reward/mean`` (and, when
            known, ``reward/min`` and ``reward/max``).
    """
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.add_subplot()
    rows = sorted(
        (it for it in iterations if _finite(it.get("reward/mean"))), key=lambda it: it["step"]
    )
    steps = [it["step"] for it in rows]
    ax.plot(steps, [it["reward/mean"] for it in rows], marker="o", ms=3, label="reward mean")
    banded = [it for it in rows if _finite(it.get("reward/min")) and _finite(it.get("reward/max"))]
    if banded:
        ax.fill_between(
            [it["step"] for it in banded],
            [it["reward/min"] for it in banded],
            [it["reward/max"] for it in banded],
            alpha=0.2,
            label="min-max",
        )
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.set_title(f"Reward per iteration: stage {stage}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
