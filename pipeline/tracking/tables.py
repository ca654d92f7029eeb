"""The tables a command prints at its end: a run's students, a method's students, a sweep's trials.

Off a terminal (a file, a ``ray job`` or pod log) :func:`console` prints every table at its
full width instead of squeezing it into 80 columns, so no budget or FLOPs count is cut.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

WIDE = 1000
"""Columns a console off a terminal may use: tables take their natural width, never more."""


def console(file: TextIO | None = None) -> Console:
    """A console for final tables: the terminal's width on a terminal, else :data:`WIDE`."""
    stream = file or sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(file=stream, highlight=False, width=None if tty else WIDE)


def summary_table(summary: Mapping[str, Any]) -> Table:
    """Teacher vs final student(s): params, FLOPs, size, accuracy, compression."""
    table = Table(title=f"n2n: {summary.get('name', 'run')}", show_lines=False)
    for column in ("model", "params", "FLOPs", "KB", "val acc", "test acc", "smaller"):
        table.add_column(column, justify="right" if column != "model" else "left")
    teacher = summary["teacher"]

    def add(name: str, facts: Mapping[str, Any], compression: str) -> None:
        table.add_row(
            name,
            f"{facts.get('params', 0):,}",
            f"{facts.get('flops', 0):,}",
            f"{facts.get('size_bytes', 0) / 1024:,.1f}",
            pct(facts.get("val_accuracy")),
            pct(facts.get("test_accuracy")),
            compression,
        )

    add("teacher", teacher, "1.0x")
    for student in summary.get("students", []):
        ratio = teacher["params"] / max(student["params"], 1)
        add(
            f"#{student['rank']}" + (" best" if student.get("best") else ""),
            student,
            f"{ratio:.1f}x",
        )
    if caption := budget_line(summary.get("budget")):
        table.caption = caption
    return table


def budget_line(budget: Mapping[str, Any] | None) -> str | None:
    """One line on the run's budget: what it was, whether the student met it and by how much."""
    if not budget:
        return None
    asked = ", ".join(f"{key} <= {n:,}" for key, n in budget["limits"].items())
    if not budget.get("margin"):
        return f"budget {asked}: no student within it"
    how = ", ".join(
        f"{key} {abs(m):.1%} {'under' if m >= 0 else 'over'}" for key, m in budget["margin"].items()
    )
    return f"budget {asked}: {'met' if budget['met'] else 'NOT met'} ({how})"


def records_table(summary: dict[str, Any]) -> Any:
    """The teacher and a method's students as a rich table (what ``n2n baseline`` prints)."""
    table = Table(title=f"n2n baseline {summary['method']}: {summary.get('name', '')}")
    columns = ("student", "params", "non-zero", "smaller", "FLOPs", "val acc", "test acc", "delta")
    for column in columns:
        table.add_column(column, justify="left" if column == "student" else "right")
    t = summary["teacher"]
    table.add_row(
        "teacher", f"{t['params']:,}", f"{t['params']:,}", "1.0x", f"{t['flops']:,}",
        pct(t["val_accuracy"]), pct(t["test_accuracy"]), "",
    )  # fmt: skip
    for r in summary["records"]:
        if r.get("error"):
            table.add_row(r["label"], "failed", r["error"][:60], "", "", "", "", "")
            continue
        best = " best" if summary.get("student") is r else ""
        table.add_row(
            r["label"] + best, f"{r['params']:,}", f"{r['nonzero_params']:,}",
            f"{r['compression']:.1f}x", f"{r['flops']:,}", pct(r["val_accuracy"]),
            pct(r["test_accuracy"]), f"{r['delta'] * 100:+.2f} pts",
        )  # fmt: skip
    return table


def sweep_table(rows: list[dict[str, Any]]) -> Table:
    """The sweep's trials as a rich table, best mean reward first."""
    table = Table(title="n2n sweep")
    for column in ("setting", "children", "R mean", "R best", "best C", "best acc"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for row in sorted(
        rows, key=lambda r: -r["reward_mean"] if r["reward_mean"] == r["reward_mean"] else 0
    ):
        table.add_row(
            row["label"], str(row["episodes"]), f"{row['reward_mean']:.3f}",
            f"{row['best_reward']:.3f}", f"{row['best_compression']:.3f}", f"{row['best_accuracy']:.3f}",
        )  # fmt: skip
    return table


def pct(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, int | float) and math.isfinite(value) else "-"
