"""The run directory: every file a search leaves behind, and reading them back on resume.

::

    RUN_DIR/
      config.yaml       the validated config (rerun or resume from it)
      state.json        which steps finished (for --resume)
      teacher/          the teacher checkpoint (when trained by the run)
      cache.sqlite      the reward cache: a resumed run trains no child twice
      children.csv      every child: stage, episode, action, arch_hash, params, flops,
                        compression, accuracy, reward, wall_time_s, cache_hit, error, ...
                        (early_stopped: accuracy and reward are lower bounds; retries:
                        times its task was lost with a worker node and run again; dropped:
                        requested removals left out because they would grow the network)
      iterations.csv    per search iteration: episodes sampled vs expected, reward stats
      pareto.csv        children no other child beats on both params and accuracy
      removal_best/     stage 1's best child (teacher weights), where stage 2 starts
      students/<rank>/  the fine-tuned top-k students (spec.json, weights.pt, metrics.json)
      best/             the final student (a copy of the best of students/)
      summary.json      teacher vs student: params, FLOPs, size, test accuracy, compression
      tune/             Ray Tune experiments (checkpoints), unless output.storage_path moves it
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

CHILD_COLUMNS = (
    "stage", "episode", "iteration", "trial", "action", "arch_hash", "params", "flops",
    "size_bytes", "compression", "accuracy", "reward", "wall_time_s", "cache_hit", "error",
    "kd_steps", "early_stopped", "retries", "removed", "dropped", "ratios", "spec",
)  # fmt: skip
ITERATION_COLUMNS = (
    "stage", "trial", "iteration", "episodes", "episodes_expected", "rl_episodes",
    "reward_mean", "reward_max", "reward_min", "best_reward", "best_compression",
    "best_accuracy", "children_total", "cache_hits", "failed", "elapsed_s",
    "learner_entropy", "learner_approx_kl", "learner_clip_fraction", "learner_vf_explained_var",
    "learner_policy_loss", "learner_vf_loss",
)  # fmt: skip
PARETO_COLUMNS = (
    "stage",
    "episode",
    "arch_hash",
    "params",
    "flops",
    "compression",
    "accuracy",
    "reward",
)
_JSON_COLUMNS = ("action", "removed", "dropped", "ratios", "spec")
_INT_COLUMNS = ("episode", "iteration", "params", "flops", "size_bytes", "kd_steps", "retries")
_FLOAT_COLUMNS = ("compression", "accuracy", "reward", "wall_time_s")


def ok(row: Mapping[str, Any]) -> bool:
    """True for a child that was evaluated without error and has a finite accuracy."""
    acc = row.get("accuracy")
    return not row.get("error") and isinstance(acc, int | float) and math.isfinite(acc)


def pareto(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Children on the accuracy-vs-params Pareto front (one per architecture), by params."""
    best: dict[str, Mapping[str, Any]] = {}
    for row in rows:
        if ok(row) and row.get("arch_hash"):
            kept = best.get(row["arch_hash"])
            if kept is None or row["accuracy"] > kept["accuracy"]:
                best[row["arch_hash"]] = row
    front, top = [], -math.inf
    for row in sorted(best.values(), key=lambda r: (r["params"], -r["accuracy"])):
        if row["accuracy"] > top:
            front.append({k: row.get(k) for k in PARETO_COLUMNS})
            top = row["accuracy"]
    return front


def _cell(value: Any, column: str) -> Any:
    if column in _JSON_COLUMNS:
        return "" if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"))
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def _parse(value: str, column: str) -> Any:
    if value == "":
        return None
    if column in _JSON_COLUMNS:
        return json.loads(value)
    if column in _INT_COLUMNS:
        return int(float(value))
    if column in _FLOAT_COLUMNS:
        return float(value)
    if column in ("cache_hit", "early_stopped"):
        return value == "True"
    return value


class RunDir:
    """Reads and writes the files of one run directory (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    # -- config and state ---------------------------------------------------------------
    def write_config(self, text: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.file("config.yaml").write_text(text)

    def state(self) -> dict[str, Any]:
        path = self.file("state.json")
        return json.loads(path.read_text()) if path.is_file() else {}

    def mark(self, step: str, **facts: Any) -> None:
        """Records that ``step`` finished, with JSON-able facts about it."""
        state = self.state()
        state[step] = {"done": True, **facts}
        self._write_json("state.json", state)

    def done(self, step: str) -> dict[str, Any] | None:
        entry = self.state().get(step)
        return entry if entry and entry.get("done") else None

    def remember(self, key: str, value: Any) -> None:
        """Stores a JSON-able fact in ``state.json`` (the MLflow run id a resume continues)."""
        state = self.state()
        state[key] = value
        self._write_json("state.json", state)

    # -- tables -------------------------------------------------------------------------
    def append_children(self, rows: list[dict[str, Any]]) -> None:
        self._append("children.csv", CHILD_COLUMNS, rows)

    def children(self, stage: str | None = None) -> list[dict[str, Any]]:
        rows = self._read("children.csv")
        return [r for r in rows if stage is None or r["stage"] == stage]

    def committed(self, stage: str) -> dict[str, int]:
        """The last committed iteration of each trial of ``stage`` (its row in iterations.csv)."""
        last: dict[str, int] = {}
        for row in self.iterations():
            if row.get("stage") == stage:
                trial = row.get("trial") or ""
                last[trial] = max(last.get(trial, 0), int(row["iteration"]))
        return last

    def drop_uncommitted(self) -> int:
        """Rewrites ``children.csv`` without the children of uncommitted iterations.

        An iteration is committed when its row is in ``iterations.csv``, written right after
        its children. A driver killed in between leaves children of an iteration that its
        Tune trial will run again from its last checkpoint on resume: they are dropped here
        (the reward cache keeps what they cost). Returns the number of rows dropped.
        """
        rows = self._read("children.csv")
        committed = {stage: self.committed(stage) for stage in {r["stage"] for r in rows}}
        kept = [
            r
            for r in rows
            if (r.get("iteration") or 0) <= committed[r["stage"]].get(r.get("trial") or "", 0)
        ]
        if len(kept) < len(rows):
            path = self.file("children.csv")
            with path.open(newline="") as fh:
                columns = tuple(next(csv.reader(fh), None) or CHILD_COLUMNS)
            tmp = self.file("children.csv.tmp")
            tmp.write_text("")
            self._append(tmp.name, columns, kept)
            tmp.replace(path)
        return len(rows) - len(kept)

    def best_curve(self) -> list[float]:
        """The best reward found so far after each child, both stages in order (a search's
        learning curve against children evaluated)."""
        best, curve = -math.inf, []
        for row in self.children():
            if not row.get("error"):
                best = max(best, float(row["reward"]))
            curve.append(best)
        return curve

    def append_iteration(self, row: dict[str, Any]) -> None:
        self._append("iterations.csv", ITERATION_COLUMNS, [row])

    def iterations(self) -> list[dict[str, str]]:
        path = self.file("iterations.csv")
        if not path.is_file():
            return []
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))

    def write_pareto(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        front = pareto(rows)
        with self.file("pareto.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=PARETO_COLUMNS)
            writer.writeheader()
            writer.writerows({k: _cell(r.get(k), k) for k in PARETO_COLUMNS} for r in front)
        return front

    def write_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        """Writes ``rows`` as a CSV file in the run directory; columns are every key, in order
        of first appearance (a failed record has fewer keys than a good one)."""
        if not rows:
            return
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with self.file(name).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows({k: _cell(v, k) for k, v in r.items()} for r in rows)

    def write_summary(self, summary: dict[str, Any]) -> None:
        self._write_json("summary.json", summary)

    def summary(self) -> dict[str, Any]:
        return json.loads(self.file("summary.json").read_text())

    # -- internals ----------------------------------------------------------------------
    def _append(self, name: str, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        path = self.file(name)
        new = not path.is_file() or path.stat().st_size == 0
        if not new:  # keep the header of a file written by an older version (on resume)
            with path.open(newline="") as fh:
                columns = tuple(next(csv.reader(fh), None) or columns)
        with path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows({k: _cell(r.get(k), k) for k in columns} for r in rows)

    def _read(self, name: str) -> list[dict[str, Any]]:
        path = self.file(name)
        if not path.is_file():
            return []
        with path.open(newline="") as fh:
            return [{k: _parse(v or "", k) for k, v in row.items()} for row in csv.DictReader(fh)]

    def _write_json(self, name: str, data: Any) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.file(name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
        tmp.replace(self.file(name))


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)
