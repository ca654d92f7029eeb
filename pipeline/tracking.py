"""MLflow tracking of one ``n2n run``: parent run, a nested run per stage, children, registry.

What a run leaves in MLflow:

- a parent run with the whole validated config as params (secrets redacted), the git commit,
  the dataset and the teacher's metrics (``teacher/params``, ``teacher/flops``,
  ``teacher/accuracy``), tags for the algorithm and stages, and ``config.yaml``;
- one nested run per search stage with per-iteration metrics as steps (``reward/mean``,
  ``reward/max``, ``reward/min``, ``best/compression``, ``best/accuracy``,
  ``children/evaluated``, ``cache/hits`` ...) and per-child metrics (``child/reward``,
  ``child/accuracy``, ``child/compression``, ``child/params``) stepped by the child's index;
- ``children.json`` on the parent: every child evaluation as one table (MLflow's
  ``log_table`` format, readable with ``mlflow.load_table``), a failed child with its error;
- on :meth:`Tracker.finish`: the Pareto plot, a reward curve per stage, the results table, the
  summary, the best student's spec, the student as an MLflow PyTorch model registered with
  alias ``champion`` and an onnxruntime-checked ONNX copy beside it.

Tracking must not cost a search its results: calls made during the search
(:meth:`Tracker.stage`, :meth:`Tracker.log_iteration`, :meth:`Tracker.log_children`) go
through an *outbox* of idempotent operations, replayed in order with bounded retries and
exponential backoff. An operation that still fails stays in the outbox and is replayed on the
next call, and the children table is always uploaded whole from memory, so an outage of the
tracking server loses no child record. :meth:`Tracker.start` and :meth:`Tracker.finish` raise
when MLflow stays unreachable, since a run without them is not tracked at all.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import mlflow
import requests
import yaml
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH
from torch import nn

from pipeline import export, plots

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
"""MLflow 3's default store: a SQLite file in the working directory, no server needed."""
CHAMPION_ALIAS = "champion"
CHILDREN_TABLE = "children.json"
REDACTED = "***"
SECRET_KEY = re.compile(r"key|secret|token|passw|credential|private", re.IGNORECASE)
"""Config keys whose values are never logged."""
SECRET_QUERY = re.compile(r"key|secret|token|passw|credential|sig", re.IGNORECASE)
"""URL query parameters whose values are never logged (``sig`` covers presigned URLs)."""
_RETRIABLE_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
_CHILD_METRICS = ("reward", "accuracy", "compression", "params")
_SUMMARY_METRICS = ("params", "flops", "size_bytes", "test_accuracy", "accuracy")


class TrackingError(RuntimeError):
    """MLflow stayed unreachable (or refused a request) after all retries."""


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff for calls to MLflow."""

    attempts: int = 6
    """Tries per operation, the first included."""
    first_delay_s: float = 1.0
    """Wait after the first failure; doubled after each further one."""
    max_delay_s: float = 16.0
    """Longest single wait."""


@dataclass(frozen=True)
class RegisteredStudent:
    """Where the final student went in MLflow."""

    run_id: str
    model_uri: str
    """The logged model, ``models:/m-...``."""
    name: str | None
    """Registered model name; None when no registry name was configured."""
    version: str | None
    onnx_artifact: str
    """Run-relative path of the ONNX copy."""
    onnx_max_abs_diff: float
    """Largest difference between onnxruntime and PyTorch logits on the check batch."""

    @property
    def champion_uri(self) -> str | None:
        """``models:/NAME@champion``, the URI people load the student from."""
        return f"models:/{self.name}@{CHAMPION_ALIAS}" if self.name else None


# -- secrets ------------------------------------------------------------------------------


def scrub(text: str) -> str:
    """``text`` with URL passwords and secret-looking query parameters replaced by ``***``."""
    text = re.sub(r"(://[^:/@\s]+):[^@/\s]+@", rf"\1:{REDACTED}@", text)
    return re.sub(
        r"([?&][^=&\s]*(?:key|secret|token|passw|credential|sig)[^=&\s]*=)[^&\s]+",
        rf"\1{REDACTED}",
        text,
        flags=re.IGNORECASE,
    )


def _scrub_url(value: str) -> str:
    parts = urlsplit(value)
    if not parts.scheme or not parts.netloc:
        return scrub(value)
    netloc = parts.netloc
    if parts.password:
        netloc = netloc.replace(f":{parts.password}@", f":{REDACTED}@", 1)
    query = urlencode(
        [(k, REDACTED if SECRET_QUERY.search(k) else v) for k, v in parse_qsl(parts.query, True)],
        safe="*",
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(value: Any) -> Any:
    """A copy of a config tree with secret-named keys masked and URL passwords removed."""
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return _scrub_url(value)
    return value


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted ``section.key`` -> string value for every leaf, redacted, fit for MLflow params.

    Lists stay one value (as JSON), so ``shrinkage.ratios`` reads ``[0.25, 0.5, 1.0]``.
    """
    flat: dict[str, str] = {}
    for key, value in redact(config).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, prefix=f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        flat[name] = _clip(text, MAX_PARAM_VAL_LENGTH)
    return flat


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_dict(config: Any) -> dict[str, Any]:
    """A pydantic config (``RunConfig``) or a mapping as a plain JSON-able dict."""
    if hasattr(config, "model_dump"):
        return config.model_dump(mode="json")
    return dict(config)


# -- helpers ------------------------------------------------------------------------------


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: ``uri`` (``--tracking-uri``), else ``MLFLOW_TRACKING_URI``, else SQLite."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def git_commit(path: Path | None = None) -> str | None:
    """The commit checked out where this package lives (with ``-dirty`` for local changes)."""
    where = path or Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _retriable(err: BaseException) -> bool:
    if isinstance(err, MlflowException):
        return err.error_code in _RETRIABLE_CODES
    return isinstance(err, requests.RequestException | ConnectionError | TimeoutError | OSError)


def _reason(err: BaseException) -> str:
    """A one-line, secret-free reason: MLflow wraps socket errors in a screenful of text."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    errno = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    if errno:
        text = errno.group(0)
    return scrub(f"{type(err).__name__}: {text}")[:200]


def _table_cell(value: Any) -> Any:
    if value is None or isinstance(value, str | bool | int | float):
        return value
    return json.dumps(value, default=str)


@dataclass
class _Op:
    what: str
    fn: Callable[[], None]
    key: str | None = None
    """Operations with the same key are coalesced: one pending copy is enough."""


@dataclass
class _Stage:
    name: str
    run_id: str | None = None
    children: int = 0
    ended: bool = False
    iterations: list[dict[str, float]] = field(default_factory=list)


class Tracker:
    """Logs one ``n2n run`` to MLflow; see the module docstring for what goes where.

    Call order: :meth:`check_reachable` (before any Ray work), :meth:`start`, then during the
    search :meth:`stage` / :meth:`log_iteration` / :meth:`log_children`, then :meth:`finish`
    and :meth:`close` (or use the tracker as a context manager, which closes it).

    Args:
        tracking_uri: MLflow tracking URI; None means ``MLFLOW_TRACKING_URI`` or
            ``sqlite:///mlflow.db`` in the working directory.
        experiment: experiment name, created when missing.
        registry_name: model registry name for the final student; None logs the model
            without registering it.
        retry: retries of each MLflow operation.
    """

    def __init__(
        self,
        tracking_uri: str | None,
        experiment: str = "n2n",
        registry_name: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        if not experiment or not experiment.strip():
            raise ValueError("MLflow experiment name is empty; set tracking.experiment, e.g. 'n2n'")
        if registry_name is not None and (not registry_name.strip() or "/" in registry_name):
            raise ValueError(
                f"registry model name {registry_name!r} is not usable; set tracking.registry_name "
                "to a non-empty name without '/', e.g. 'n2n-student'"
            )
        self.uri = resolve_tracking_uri(tracking_uri)
        self.safe_uri = _scrub_url(self.uri)
        self.experiment = experiment
        self.registry_name = registry_name
        self.retry = retry or RetryPolicy()
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.children: list[dict[str, Any]] = []
        """Every child record logged so far, in arrival order: the source of ``children.json``."""
        self._teacher: dict[str, Any] = {}
        self._dataset: str | None = None
        self._stages: dict[str, _Stage] = {}
        self._outbox: deque[_Op] = deque()
        self._lock = threading.RLock()
        self._closed = False
        self._table_tagged = False

    @functools.cached_property
    def client(self) -> mlflow.MlflowClient:
        """The MLflow client, made on first use (a SQLite client creates its file at once)."""
        return mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    # -- before the run -------------------------------------------------------------------

    def check_reachable(self) -> None:
        """Fails fast when MLflow cannot be used, so no Ray work starts for an untracked run.

        Raises:
            ValueError: one sentence naming the URI and the fix.
        """
        fix = (
            "start the server, pass another --tracking-uri (or MLFLOW_TRACKING_URI), "
            f"or leave both unset to log to {DEFAULT_TRACKING_URI} in the working directory"
        )
        scheme = urlsplit(self.uri).scheme
        if scheme in ("http", "https"):
            try:
                response = requests.get(f"{self.uri.rstrip('/')}/health", timeout=5)
            except requests.RequestException as err:
                raise ValueError(
                    f"MLflow tracking server {self.safe_uri} is unreachable "
                    f"({type(err).__name__}); {fix}"
                ) from None
            if response.status_code >= 500:
                raise ValueError(
                    f"MLflow tracking server {self.safe_uri} answers /health with HTTP "
                    f"{response.status_code}; {fix}"
                )
        elif scheme == "sqlite":
            path = self.uri.removeprefix("sqlite:///")
            folder = Path(path).expanduser().resolve().parent
            if path != ":memory:" and not folder.is_dir():
                raise ValueError(
                    f"MLflow store {self.safe_uri} lies in {folder}, which does not exist; "
                    "create the folder or use another --tracking-uri"
                )
        try:
            self.experiment_id = self._call(self._ensure_experiment, "find the experiment")
        except TrackingError as err:
            raise ValueError(f"MLflow at {self.safe_uri} cannot be used ({err}); {fix}") from None

    def _ensure_experiment(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                raise ValueError(
                    f"MLflow experiment {self.experiment!r} is deleted; restore it "
                    "(mlflow experiments restore) or choose another tracking.experiment"
                )
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment)
        except MlflowException as err:  # created concurrently by another run
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(self.experiment).experiment_id

    # -- the parent run -------------------------------------------------------------------

    def start(
        self,
        config: Any,
        teacher: Mapping[str, Any],
        *,
        dataset: str,
        tags: Mapping[str, Any] | None = None,
        run_name: str | None = None,
    ) -> str:
        """Opens the parent run and logs the config, teacher metrics, dataset and commit.

        Args:
            config: the validated run config (a ``RunConfig`` or its dict); logged flattened
                as params and whole as ``config.yaml``, secrets redacted.
            teacher: teacher facts: ``params``, ``flops``, ``size_bytes``, ``test_accuracy``
                (numbers become ``teacher/...`` metrics), ``arch`` (a tag).
            dataset: the dataset name (tag ``n2n.dataset``, and a registry tag later).
            tags: run tags, e.g. ``{"algo": "ppo", "stages": "removal,shrinkage"}``; logged
                as ``n2n.<key>``.
            run_name: the run's display name; defaults to ``config["name"]``.

        Returns:
            The parent run id.

        Raises:
            TrackingError: MLflow stayed unreachable through all retries.
        """
        if self.run_id is not None:
            raise RuntimeError(f"tracker already started run {self.run_id}")
        if self.experiment_id is None:
            self.experiment_id = self._call(self._ensure_experiment, "find the experiment")
        cfg = redact(_as_dict(config))
        self._teacher = dict(teacher)
        self._dataset = dataset
        run_tags = {
            f"n2n.{k}": _clip(scrub(str(v)), MAX_TAG_VAL_LENGTH)
            for k, v in redact(dict(tags or {})).items()
        }
        run_tags |= {"n2n.dataset": dataset, "mlflow.source.name": "n2n run"}
        if "arch" in teacher:
            run_tags["n2n.teacher"] = str(teacher["arch"])
        commit = git_commit()
        if commit:
            run_tags["mlflow.source.git.commit"] = commit
        name = run_name or str(cfg.get("name") or "n2n")
        run = self._call(
            lambda: self.client.create_run(self.experiment_id, run_name=name, tags=run_tags),
            "create the parent run",
        )
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in flatten_config(cfg).items()]
        now = int(time.time() * 1000)
        metrics = [
            Metric(f"teacher/{'accuracy' if k == 'test_accuracy' else k}", float(v), now, 0)
            for k, v in teacher.items()
            if _finite(v)
        ]
        self._call(
            lambda: self.client.log_batch(self.run_id, metrics=metrics, params=params),
            "log the config",
        )
        self._call(
            lambda: self.client.log_text(
                self.run_id, yaml.safe_dump(cfg, sort_keys=False), "config.yaml"
            ),
            "log config.yaml",
        )
        logger.info(
            "MLflow run %s in experiment %r at %s", self.run_id, self.experiment, self.safe_uri
        )
        return self.run_id

    # -- during the search ----------------------------------------------------------------

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[str]:
        """A nested run for one search stage, ended FINISHED (or FAILED on an exception).

        Yields:
            The stage name, the key for :meth:`log_iteration` and the ``stage`` of records.
        """
        self._stage(name)
        status = "FAILED"
        try:
            yield name
            status = "FINISHED"
        finally:
            self._end_stage(name, status)

    def log_iteration(self, stage: str, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs one search iteration's metrics (``reward/mean`` ...) as step ``step`` of a stage.

        Never raises for MLflow trouble: what cannot be sent now is sent with the next call.
        """
        values = {k: float(v) for k, v in metrics.items() if _finite(v)}
        with self._lock:
            st = self._stage(stage)
            st.iterations.append({"step": int(step), **values})
            now = int(time.time() * 1000)
            batch = [Metric(k, v, now, int(step)) for k, v in values.items()]
            self._submit(
                f"log iteration {step} of stage {stage}", lambda: self._log_metrics(st, batch)
            )

    def log_children(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Records child evaluations: per-child metrics on the stage run and the whole table.

        Each record is a row of ``children.csv`` (stage, episode, action, arch_hash, params,
        flops, compression, accuracy, reward, wall_time_s, cache_hit, error). A failed child
        keeps its ``error`` text. Never raises for MLflow trouble: nothing is lost, the table
        is re-sent whole from memory once MLflow answers again.
        """
        if not records:
            return
        with self._lock:
            self._require_run()
            now = int(time.time() * 1000)
            by_stage: dict[str, list[Metric]] = {}
            for record in records:
                row = {k: _table_cell(v) for k, v in record.items()}
                row["error"] = str(record.get("error") or "")
                self.children.append(row)
                st = self._stage(str(record.get("stage") or "search"))
                for key in _CHILD_METRICS:
                    value = record.get(key)
                    if _finite(value) and not (key == "accuracy" and row["error"]):
                        by_stage.setdefault(st.name, []).append(
                            Metric(f"child/{key}", float(value), now, st.children)
                        )
                st.children += 1
            for name, batch in by_stage.items():
                st = self._stages[name]
                self._submit(
                    f"log {len(batch)} child metrics of stage {name}",
                    lambda st=st, b=batch: self._log_metrics(st, b),
                )
            self._submit(f"upload {CHILDREN_TABLE}", self._upload_children, key=CHILDREN_TABLE)

    def tune_callback(self, stage: str) -> Any:
        """A Ray Tune ``MLflowLoggerCallback`` whose trial runs nest under ``stage``'s run.

        Trial configs are redacted like the run config before they become params.
        """
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        with self._lock:
            st = self._stage(stage)
            self._drain(strict=True)

        class RedactingMLflowLoggerCallback(MLflowLoggerCallback):
            def setup(self, *args: Any, **kwargs: Any) -> None:
                super().setup(*args, **kwargs)
                log_params = self.mlflow_util.log_params

                def redacted(params_to_log: dict, run_id: str | None = None) -> None:
                    log_params(params_to_log=redact(params_to_log), run_id=run_id)

                self.mlflow_util.log_params = redacted

        return RedactingMLflowLoggerCallback(
            tracking_uri=self.uri,
            registry_uri=self.uri,
            experiment_name=self.experiment,
            tags={"mlflow.parentRunId": st.run_id, "n2n.stage": stage},
            save_artifact=False,
        )

    # -- the end --------------------------------------------------------------------------

    def finish(
        self,
        run_dir: str | Path,
        student: nn.Module,
        student_spec: Mapping[str, Any],
        summary: Mapping[str, Any],
        example_inputs: Any | None = None,
    ) -> RegisteredStudent:
        """Logs the results and the final student, registers it and points ``champion`` at it.

        Args:
            run_dir: the search's run directory; its result files (``children.csv``,
                ``iterations.csv``, ``pareto.csv``, ``summary.json``, students' ``spec.json``
                and ``metrics.json``) are logged under ``run/``, never its ``config.yaml``
                (which may hold secrets: the redacted config is logged by :meth:`start`).
            student: the best student network (copied; left untouched).
            student_spec: its student spec, logged as ``student/spec.json``.
            summary: ``{"teacher": {...}, "student": {params, flops, size_bytes,
                test_accuracy, ...}, "compression_ratio": ..., "baselines": [...]}``.
            example_inputs: a float32 batch ``[N>1, C, H, W]`` for the model signature and the
                ONNX check; default a fixed random batch of the spec's input shape.

        Raises:
            TrackingError: MLflow stayed unreachable through all retries.
        """
        with self._lock:
            run_id = self._require_run()
            self._drain(strict=True)
            run_dir = Path(run_dir)
            self._log_run_dir(run_dir)
            self._log_summary(summary, student_spec)
            self._log_plots(run_dir, summary)
            return self._log_student(student, student_spec, summary, example_inputs, run_id)

    def close(self, status: str = "FINISHED") -> None:
        """Sends what is still pending, ends open stage runs and the parent run with ``status``."""
        with self._lock:
            if self._closed or self.run_id is None:
                self._closed = True
                return
            self._closed = True
            for st in self._stages.values():
                if not st.ended:
                    self._end_stage(st.name, status)
            self._drain(strict=False)
            if self._outbox:
                logger.error(
                    "%d MLflow operations could not be sent to %s (first: %s); the run directory "
                    "holds every record",
                    len(self._outbox), self.safe_uri, self._outbox[0].what,
                )  # fmt: skip
            with contextlib.suppress(TrackingError):
                self._call(lambda: self._terminate(self.run_id, status), "end the parent run")

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    # -- finish helpers -------------------------------------------------------------------

    def _log_run_dir(self, run_dir: Path) -> None:
        files = [
            run_dir / n for n in ("children.csv", "iterations.csv", "pareto.csv", "summary.json")
        ]
        for sub in [run_dir / "best", *sorted((run_dir / "students").glob("*"))]:
            files += [sub / "spec.json", sub / "metrics.json"]
        for path in files:
            if path.is_file():
                rel = path.relative_to(run_dir).parent.as_posix()
                dest = "run" if rel == "." else f"run/{rel}"
                self._call(
                    lambda p=path, d=dest: self.client.log_artifact(self.run_id, str(p), d),
                    f"log {path.name}",
                )

    def _log_summary(self, summary: Mapping[str, Any], spec: Mapping[str, Any]) -> None:
        student = summary.get("student", {})
        now = int(time.time() * 1000)
        metrics = [
            Metric(
                f"student/{'accuracy' if k == 'test_accuracy' else k}", float(student[k]), now, 0
            )
            for k in _SUMMARY_METRICS
            if _finite(student.get(k)) and not (k == "accuracy" and "test_accuracy" in student)
        ]
        if _finite(summary.get("compression_ratio")):
            metrics.append(Metric("compression/ratio", float(summary["compression_ratio"]), now, 0))
        self._call(
            lambda: self.client.log_batch(self.run_id, metrics=metrics), "log the summary metrics"
        )
        self._call(
            lambda: self.client.log_dict(self.run_id, dict(summary), "summary.json"),
            "log summary.json",
        )
        self._call(
            lambda: self.client.log_dict(self.run_id, dict(spec), "student/spec.json"),
            "log the student spec",
        )
        rows = self._results_rows(summary)
        if rows:
            self._call(lambda: self._log_table(rows, "results.json"), "log results.json")

    def _results_rows(self, summary: Mapping[str, Any]) -> list[dict[str, Any]]:
        rows = [
            {
                "name": "teacher",
                **{k: _table_cell(v) for k, v in summary.get("teacher", {}).items()},
            }
        ]
        for i, student in enumerate(summary.get("students") or [summary.get("student", {})]):
            rows.append(
                {
                    "name": student.get("name", f"student {i + 1}"),
                    **{k: _table_cell(v) for k, v in student.items() if k != "name"},
                }
            )
        for baseline in summary.get("baselines", []):
            rows.append({k: _table_cell(v) for k, v in baseline.items()})
        return rows

    def _log_plots(self, run_dir: Path, summary: Mapping[str, Any]) -> None:
        teacher = {**self._teacher, **summary.get("teacher", {})}
        teacher["accuracy"] = teacher.get("test_accuracy", teacher.get("accuracy"))
        students = []
        for i, student in enumerate(summary.get("students") or [summary.get("student", {})]):
            acc = student.get("test_accuracy", student.get("accuracy"))
            students.append(
                {
                    "name": student.get("name", f"#{i + 1}"),
                    "params": student.get("params"),
                    "accuracy": acc,
                }
            )
        baselines = [
            {**b, "accuracy": b.get("test_accuracy", b.get("accuracy"))}
            for b in summary.get("baselines", [])
        ]
        figures = {
            "plots/pareto.png": plots.pareto_figure(teacher, self.children, students, baselines)
        }
        for st in self._stages.values():
            if st.iterations:
                figures[f"plots/reward_{st.name}.png"] = plots.reward_curve_figure(
                    st.name, st.iterations
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
        run_id: str,
    ) -> RegisteredStudent:
        import torch

        model = export.inference_copy(student)
        if example_inputs is None:
            example_inputs = export.example_batch(spec["base"]["input_shape"])
        example = torch.as_tensor(example_inputs, dtype=torch.float32)[:8].cpu()
        if example.shape[0] < 2:
            raise ValueError(
                f"example_inputs has batch size {example.shape[0]}; pass at least 2 examples so "
                "the logged model keeps a dynamic batch axis"
            )
        signature = export.tensor_signature(model, example)
        with tempfile.TemporaryDirectory() as tmp:
            onnx = export.export_onnx(model, example, Path(tmp) / "student.onnx")
            self._call(
                lambda: self.client.log_artifact(run_id, str(onnx.path), "student_onnx"),
                "log the ONNX copy",
            )
        if not onnx.matches:
            logger.warning(
                "ONNX copy differs from PyTorch by %.2e (> %.0e); it is logged but tagged onnx_matches=false",
                onnx.max_abs_diff, export.ONNX_TOLERANCE,
            )  # fmt: skip
        now = int(time.time() * 1000)
        self._call(
            lambda: self.client.log_batch(
                run_id, metrics=[Metric("onnx/max_abs_diff", onnx.max_abs_diff, now, 0)]
            ),
            "log the ONNX check",
        )
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        requirements = [
            f"torch=={torch.__version__.split('+')[0]}",
            f"mlflow=={mlflow.__version__}",
        ]

        def log_model() -> Any:
            with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
                return mlflow.pytorch.log_model(
                    model,
                    name="student",
                    input_example=example.numpy(),
                    signature=signature,
                    registered_model_name=self.registry_name,
                    pip_requirements=requirements,
                    await_registration_for=60,
                )

        info = self._call(log_model, "log the student model")
        version = None
        if self.registry_name:
            version = str(info.registered_model_version)
            self._call(
                lambda: self.client.set_registered_model_alias(
                    self.registry_name, CHAMPION_ALIAS, version
                ),
                f"set alias {CHAMPION_ALIAS}",
            )
            for key, value in self._version_tags(spec, summary, onnx, run_id).items():
                self._call(
                    lambda k=key, v=value: self.client.set_model_version_tag(
                        self.registry_name, version, k, v
                    ),
                    f"tag model version {version}",
                )
            logger.info(
                "registered %s version %s as @%s", self.registry_name, version, CHAMPION_ALIAS
            )
        return RegisteredStudent(
            run_id=run_id,
            model_uri=info.model_uri,
            name=self.registry_name,
            version=version,
            onnx_artifact="student_onnx/student.onnx",
            onnx_max_abs_diff=onnx.max_abs_diff,
        )

    def _version_tags(
        self,
        spec: Mapping[str, Any],
        summary: Mapping[str, Any],
        onnx: export.OnnxExport,
        run_id: str,
    ) -> dict[str, str]:
        student = summary.get("student", {})
        teacher = {**self._teacher, **summary.get("teacher", {})}
        tags = {
            "compression_ratio": summary.get("compression_ratio"),
            "params": student.get("params"),
            "flops": student.get("flops"),
            "test_accuracy": student.get("test_accuracy", student.get("accuracy")),
            "teacher": teacher.get("arch") or spec.get("base", {}).get("arch"),
            "teacher_params": teacher.get("params"),
            "teacher_test_accuracy": teacher.get("test_accuracy", teacher.get("accuracy")),
            "dataset": self._dataset,
            "arch_hash": student.get("arch_hash"),
            "onnx": f"runs:/{run_id}/student_onnx/student.onnx",
            "onnx_matches": str(onnx.matches).lower(),
            "source_run": run_id,
        }
        return {k: str(v) for k, v in tags.items() if v is not None}

    # -- outbox and retries ---------------------------------------------------------------

    def _require_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("Tracker.start() must be called before logging to a run")
        return self.run_id

    def _stage(self, name: str) -> _Stage:
        with self._lock:
            self._require_run()
            if name not in self._stages:
                st = self._stages[name] = _Stage(name)
                self._submit(f"create the run of stage {name}", lambda: self._create_stage(st))
            return self._stages[name]

    def _create_stage(self, st: _Stage) -> None:
        if st.run_id is not None:
            return
        tags = {"mlflow.parentRunId": self.run_id, "n2n.stage": st.name}
        run = self.client.create_run(self.experiment_id, run_name=f"stage-{st.name}", tags=tags)
        st.run_id = run.info.run_id

    def _end_stage(self, name: str, status: str) -> None:
        with self._lock:
            st = self._stages[name]
            st.ended = True
            self._submit(f"end stage {name}", lambda: self._terminate(st.run_id, status))

    def _terminate(self, run_id: str | None, status: str) -> None:
        if run_id is not None:
            self.client.set_terminated(run_id, status)

    def _log_metrics(self, st: _Stage, batch: list[Metric]) -> None:
        self.client.log_batch(st.run_id or self.run_id, metrics=batch)

    def _upload_children(self) -> None:
        self._log_table(self.children, CHILDREN_TABLE)

    def _log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Writes ``rows`` in ``mlflow.log_table``'s JSON layout, replacing any earlier copy.

        ``log_table`` itself appends to an existing file, which a retried upload would
        duplicate; rewriting the whole table is idempotent.
        """
        import pandas as pd

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / artifact_file
            pd.DataFrame(list(rows)).to_json(path, orient="split", index=False)
            self.client.log_artifact(self.run_id, str(path))
        if artifact_file == CHILDREN_TABLE and self._table_tagged:
            return
        tag = json.loads(
            self.client.get_run(self.run_id).data.tags.get("mlflow.loggedArtifacts", "[]")
        )
        entry = {"path": artifact_file, "type": "table"}
        if entry not in tag:
            self.client.set_tag(self.run_id, "mlflow.loggedArtifacts", json.dumps(tag + [entry]))
        self._table_tagged |= artifact_file == CHILDREN_TABLE

    def _submit(self, what: str, fn: Callable[[], None], key: str | None = None) -> None:
        """Queues an operation (once per ``key``) and sends everything queued, in order."""
        if key is None or all(op.key != key for op in self._outbox):
            self._outbox.append(_Op(what, fn, key))
        self._drain(strict=False)

    def _drain(self, strict: bool) -> None:
        """Sends queued operations in order; stops at the first that fails all its retries.

        Args:
            strict: raise :class:`TrackingError` then, instead of keeping it for later.
        """
        while self._outbox:
            op = self._outbox[0]
            try:
                self._call(op.fn, op.what)
            except TrackingError as err:
                if strict:
                    raise
                if not getattr(err, "retriable", True):
                    logger.error("dropping MLflow operation that cannot succeed: %s", err)
                    self._outbox.popleft()
                    continue
                logger.warning(
                    "MLflow is unavailable (%s); %d operations kept and sent with the next call",
                    err, len(self._outbox),
                )  # fmt: skip
                return
            self._outbox.popleft()

    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        """Runs ``fn`` with bounded retries and exponential backoff on transient errors."""
        delay = self.retry.first_delay_s
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return fn()
            except Exception as err:  # MLflow, requests and OS errors, classified below
                reason = _reason(err)
                if not _retriable(err):
                    failure = TrackingError(f"could not {what}: {reason}")
                    failure.retriable = False
                    raise failure from None
                if attempt == self.retry.attempts:
                    raise TrackingError(
                        f"could not {what} after {attempt} attempts: {reason}"
                    ) from None
                logger.warning(
                    "could not %s (%s); retry %d of %d in %.1f s",
                    what, reason, attempt, self.retry.attempts - 1, delay,
                )  # fmt: skip
                time.sleep(delay)
                delay = min(delay * 2, self.retry.max_delay_s)
        raise AssertionError("unreachable")
