"""What a finished run leaves in MLflow: result files, tables, plots and the student model.

:class:`ResultLogging` holds the end of a :class:`~pipeline.tracking.tracker.Tracker`'s
life: :meth:`~ResultLogging.finish` for a search (the run directory's files, ``results.json``,
the Pareto plot and reward curves, the student registered with alias ``champion`` and an ONNX
copy), :meth:`~ResultLogging.log_baseline` for a classic method's students.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow.entities import Metric
from torch import nn

from pipeline.tracking import export, plots, registry
from pipeline.tracking.registry import RegisteredStudent

T = TypeVar("T")
CHILD_METRICS = ("reward", "accuracy", "compression", "params")
"""What each child logs as ``child/<key>`` metrics, stepped by its index."""
RUN_DIR_FILES = ("children.csv", "iterations.csv", "pareto.csv", "summary.json")
"""Result files of the search's run directory logged under ``run/`` (never ``config.yaml``,
which is unredacted: ``Tracker.start`` logs the redacted config)."""


CHILDREN_TABLE = "children.json"
CHILD_METRICS = ("reward", "accuracy", "compression", "params")


def finite_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if finite(v)}


def first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


@dataclass
class StageRun:
    name: str
    run_id: str | None = None
    children: int = 0
    ended: bool = False
    iterations: list[dict[str, float]] = field(default_factory=list)


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def cell(value: Any) -> Any:
    """A table cell: scalars as they are, anything else (an action list) as JSON text."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    return json.dumps(value, default=str)


def now_ms() -> int:
    return int(time.time() * 1000)


def accuracy_of(facts: Mapping[str, Any]) -> Any:
    return facts.get("test_accuracy", facts.get("accuracy"))


class ResultLogging:
    """The result logging of :class:`~pipeline.tracking.tracker.Tracker` (which mixes it in
    and provides the client, the open run and the retrying call)."""

    client: mlflow.MlflowClient
    run_id: str | None
    registry_name: str | None
    children: list[dict[str, Any]]
    _teacher: dict[str, Any]
    _dataset: str | None
    _stages: dict[str, Any]
    _call: Callable[..., Any]
    _lock: Any
    outbox: Any
    _require_run: Callable[[], str]

    def _log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Writes ``rows`` in ``mlflow.log_table``'s layout, replacing any earlier copy.

        ``log_table`` itself appends to an existing file, which a retried upload would
        duplicate; rewriting the whole table is idempotent.
        """
        import pandas as pd

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / artifact_file
            pd.DataFrame(rows).to_json(path, orient="split", index=False)
            self.client.log_artifact(self.run_id, str(path))
        tags = self.client.get_run(self.run_id).data.tags
        logged = json.loads(tags.get("mlflow.loggedArtifacts", "[]"))
        if {"path": artifact_file, "type": "table"} not in logged:
            logged.append({"path": artifact_file, "type": "table"})
            self.client.set_tag(self.run_id, "mlflow.loggedArtifacts", json.dumps(logged))

    def finish(
        self,
        run_dir: str | Path,
        student: nn.Module,
        student_spec: Mapping[str, Any],
        summary: Mapping[str, Any],
        example_inputs: Any | None = None,
    ) -> RegisteredStudent:
        """Logs the results and the student, registers it and points ``@champion`` at it.

        Args:
            run_dir: the search's run directory; its result files (:data:`RUN_DIR_FILES`,
                ``spec.json`` and ``metrics.json`` of ``best/`` and ``students/*/``) are logged
                under ``run/``.
            student: the best student network (copied, left untouched).
            student_spec: its student spec, logged as ``student/spec.json``.
            summary: ``{"teacher": {...}, "student": {params, flops, size_bytes,
                test_accuracy, arch_hash}, "compression_ratio": ..., "students": [...]
                (optional, all final students), "baselines": [{name, params,
                test_accuracy}] (optional)}``.
            example_inputs: a float32 batch ``[N>1, C, H, W]`` for the model signature and the
                ONNX check; defaults to a fixed random batch of the spec's input shape.

        Raises:
            TrackingError: MLflow stayed unreachable through all retries.
            ValueError: ``example_inputs`` has fewer than 2 examples.
        """
        with self._lock:
            self._require_run()
            self.outbox.drain(strict=True)
            self._log_run_dir(Path(run_dir))
            self._log_results(summary, student_spec)
            self._log_plots(summary)
            return self._log_student(student, student_spec, summary, example_inputs)

    def log_baseline(self, run_dir: str | Path, summary: Mapping[str, Any]) -> None:
        """Logs a classic method's students (``n2n baseline``): metrics, table, plot, files.

        Each student record becomes step ``index`` of ``student/params``,
        ``student/nonzero_params``, ``student/accuracy`` (test), ``student/val_accuracy`` and
        ``compression/ratio``; all records go to ``results.json``, the summary to
        ``summary.json`` and the accuracy/size plot to ``plots/pareto.png``.
        """
        keys = {
            "params": "student/params", "nonzero_params": "student/nonzero_params",
            "test_accuracy": "student/accuracy", "val_accuracy": "student/val_accuracy",
            "compression": "compression/ratio",
        }  # fmt: skip
        records = [dict(r) for r in summary.get("records", [])]
        with self._lock:
            self._require_run()
            metrics = [
                Metric(name, float(r[key]), now_ms(), int(r.get("index", i)))
                for i, r in enumerate(records)
                for key, name in keys.items()
                if finite(r.get(key))
            ]
            self._call(lambda: self.client.log_batch(self.run_id, metrics), "log the students")
            rows = [{k: cell(v) for k, v in r.items()} for r in records]
            self._call(lambda: self._log_table(rows, "results.json"), "log results.json")
            self._call(
                lambda: self.client.log_dict(self.run_id, dict(summary), "summary.json"),
                "log summary.json",
            )
            for name in ("students.csv", "summary.json"):
                path = Path(run_dir) / name
                if path.is_file():
                    self._call(
                        lambda p=path: self.client.log_artifact(self.run_id, str(p), "run"),
                        f"log {name}",
                    )
            teacher = {**self._teacher, **summary.get("teacher", {})}
            teacher["accuracy"] = accuracy_of(teacher)
            points = [
                {"name": r.get("label"), "params": r.get("params"), "accuracy": accuracy_of(r)}
                for r in records
                if not r.get("error")
            ]
            fig = plots.pareto_figure(teacher, [], [], points)
            self._call(
                lambda: self.client.log_figure(self.run_id, fig, "plots/pareto.png"),
                "log plots/pareto.png",
            )

    # -- finish helpers -------------------------------------------------------------------

    def _log_run_dir(self, run_dir: Path) -> None:
        files = [run_dir / name for name in RUN_DIR_FILES]
        for sub in [run_dir / "best", *sorted((run_dir / "students").glob("*"))]:
            files += [sub / "spec.json", sub / "metrics.json"]
        for path in filter(Path.is_file, files):
            dest = Path("run", path.relative_to(run_dir).parent).as_posix()
            self._call(
                lambda p=path, d=dest: self.client.log_artifact(self.run_id, str(p), d),
                f"log {path.relative_to(run_dir)}",
            )

    def _students(self, summary: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The final students (all ranks, else the best one), each with a display ``name``."""
        students = [dict(s) for s in summary.get("students") or [summary.get("student", {})]]
        for i, s in enumerate(students, 1):
            s["name"] = s.get("name") or f"student {s.get('rank', i)}" + (
                " (best)" if s.get("best") else ""
            )
        return students

    def _log_results(self, summary: Mapping[str, Any], spec: Mapping[str, Any]) -> None:
        student = summary.get("student", {})
        metrics = [
            Metric(f"student/{'accuracy' if k == 'test_accuracy' else k}", float(student[k]), 0, 0)
            for k in ("params", "flops", "size_bytes", "test_accuracy")
            if finite(student.get(k))
        ]
        if finite(summary.get("compression_ratio")):
            metrics.append(Metric("compression/ratio", float(summary["compression_ratio"]), 0, 0))
        if budget := summary.get("budget"):
            metrics.append(Metric("budget/met", float(bool(budget["met"])), 0, 0))
            for key, n in budget["limits"].items():
                metrics.append(Metric(f"budget/{key}", float(n), 0, 0))
            for key, margin in budget.get("margin", {}).items():
                metrics.append(Metric(f"budget/{key}_margin", float(margin), 0, 0))
        metrics = [Metric(m.key, m.value, now_ms(), 0) for m in metrics]
        self._call(lambda: self.client.log_batch(self.run_id, metrics), "log the results")
        for obj, path in ((dict(summary), "summary.json"), (dict(spec), "student/spec.json")):
            self._call(lambda o=obj, p=path: self.client.log_dict(self.run_id, o, p), f"log {path}")
        rows = [{"name": "teacher", **summary.get("teacher", {})}]
        rows += self._students(summary)
        rows += [dict(b) for b in summary.get("baselines", [])]
        rows = [{k: cell(v) for k, v in row.items()} for row in rows]
        self._call(lambda: self._log_table(rows, "results.json"), "log results.json")

    def _log_plots(self, summary: Mapping[str, Any]) -> None:
        teacher = {**self._teacher, **summary.get("teacher", {})}
        teacher["accuracy"] = accuracy_of(teacher)
        students = [
            {"name": s["name"], "params": s.get("params"), "accuracy": accuracy_of(s)}
            for s in self._students(summary)
        ]
        baselines = [{**b, "accuracy": accuracy_of(b)} for b in summary.get("baselines", [])]
        figures = {
            "plots/pareto.png": plots.pareto_figure(teacher, self.children, students, baselines)
        }
        for st in self._stages.values():
            if st.iterations:
                figures[f"plots/reward_{st.name.replace('/', '_')}.png"] = (
                    plots.reward_curve_figure(st.name, st.iterations)
                )
        for path, fig in figures.items():
            self._call(
                lambda f=fig, p=path: self.client.log_figure(self.run_id, f, p), f"log {path}"
            )

    def _log_student(
        self,
        student: nn.Module,
        spec: Mapping[str, Any],
        summary: Mapping[str, Any],
        example_inputs: Any | None,
    ) -> RegisteredStudent:
        if example_inputs is None:
            example_inputs = export.example_batch(spec["base"]["input_shape"])
        info, onnx = registry.log_student(
            self.client, self.run_id, student, example_inputs, self.registry_name, self._call
        )
        version = str(info.registered_model_version) if self.registry_name else None
        if version is not None:
            student_facts = summary.get("student", {})
            teacher = {**self._teacher, **summary.get("teacher", {})}
            arch = teacher.get("arch") or spec.get("base", {}).get("arch")
            onnx_uri = f"runs:/{self.run_id}/{registry.ONNX_ARTIFACT}"
            tags = {
                "compression_ratio": summary.get("compression_ratio"),
                "params": student_facts.get("params"),
                "flops": student_facts.get("flops"),
                "test_accuracy": accuracy_of(student_facts),
                "teacher": arch,
                "teacher_params": teacher.get("params"),
                "teacher_test_accuracy": accuracy_of(teacher),
                "dataset": self._dataset,
                "arch_hash": student_facts.get("arch_hash"),
                "onnx": onnx_uri,
                "onnx_matches": str(onnx.matches).lower(),
                "source_run": self.run_id,
            }
            ratio = summary.get("compression_ratio")
            description = (
                f"{arch} compressed by n2n on {self._dataset}: "
                f"{student_facts.get('params')} parameters"
                + (f" ({ratio:.1f}x fewer)" if finite(ratio) else "")
                + f", test accuracy {accuracy_of(student_facts)}. ONNX copy: {onnx_uri}"
            )
            registry.crown(self.client, self.registry_name, version, tags, description, self._call)
        return RegisteredStudent(
            self.run_id, info.model_uri, self.registry_name, version, onnx.max_abs_diff
        )
