"""MLflow tracking of one ``n2n run``: parent run, a nested run per stage, children, registry.

What a run leaves in MLflow:

- a parent run with the whole validated config as params (secrets redacted), the git commit,
  the dataset and the teacher's metrics (``teacher/params``, ``teacher/flops``,
  ``teacher/accuracy``), tags for the algorithm and stages, and ``config.yaml``;
- one nested run per search stage with per-iteration metrics as steps (``reward/mean``,
  ``reward/max``, ``reward/min``, ``best/compression``, ``best/accuracy``,
  ``children/evaluated``, ``cache/hits`` ...) and per-child metrics (``child/reward``,
  ``child/accuracy``, ``child/compression``, ``child/params``) stepped by the child's index;
- ``children.json`` on the parent: every child evaluation in one table (``mlflow.log_table``'s
  format, so the UI shows it and ``mlflow.load_table`` reads it), a failed child with its error;
- from :meth:`Tracker.finish`: the Pareto plot, a reward curve per stage, ``results.json``,
  ``summary.json``, the best student's spec, the student as an MLflow PyTorch model registered
  with alias ``champion``, and an ONNX copy checked with onnxruntime.

Tracking must not cost a search its results: what is logged during the search goes through an
:class:`~pipeline.tracking.outbox.Outbox`, so an outage of the tracking server delays records and loses
none (the children table is re-sent whole from memory). :meth:`Tracker.start` and
:meth:`Tracker.finish` raise :class:`~pipeline.tracking.outbox.TrackingError` when MLflow stays
unreachable, since a run without them is not tracked at all.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import mlflow
import requests
import yaml
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from torch import nn

from pipeline.cluster.job_paths import DEFAULT_TRACKING_URI, resolve_tracking_uri, sqlite_path
from pipeline.tracking import export, plots, registry
from pipeline.tracking.outbox import Outbox, RetryPolicy, TrackingError, call_with_retries
from pipeline.tracking.redaction import clip, flatten_config, redact, scrub, scrub_url
from pipeline.tracking.registry import CHAMPION_ALIAS, RegisteredStudent

logger = logging.getLogger(__name__)

T = TypeVar("T")
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""Opens the experiment in the UI on its runs (model training), not on GenAI traces."""
UI_VIEW = "workflowType=machine_learning"
"""MLflow 3.17's UI picks its view from this query parameter (else GenAI); the experiment tag
above decides where that switch is off."""
CHILDREN_TABLE = "children.json"
RUN_DIR_FILES = ("children.csv", "iterations.csv", "pareto.csv", "summary.json")
"""Result files of the search's run directory logged under ``run/`` (never ``config.yaml``,
which is unredacted: :meth:`Tracker.start` logs the redacted config)."""
_CHILD_METRICS = ("reward", "accuracy", "compression", "params")

__all__ = [
    "CHAMPION_ALIAS",
    "RegisteredStudent",
    "RetryPolicy",
    "Tracker",
    "TrackingError",
    "resolve_tracking_uri",
]


def git_commit(where: Path | None = None) -> str | None:
    """The commit checked out where this package lives, ``-dirty`` with local changes."""
    git = ["git", "-C", str(where or Path(__file__).resolve().parent)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
        status = [*git, "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(status, capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "") if head.returncode == 0 else None


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _cell(value: Any) -> Any:
    """A table cell: scalars as they are, anything else (an action list) as JSON text."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    return json.dumps(value, default=str)


def _finite_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if _finite(v)}


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def _now_ms() -> int:
    return int(time.time() * 1000)


def _accuracy(facts: Mapping[str, Any]) -> Any:
    return facts.get("test_accuracy", facts.get("accuracy"))


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
    search :meth:`stage`, :meth:`log_iteration` and :meth:`log_children`, then :meth:`finish`
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
        if not experiment.strip():
            raise ValueError("MLflow experiment name is empty; set tracking.experiment, e.g. 'n2n'")
        if registry_name is not None and (not registry_name.strip() or "/" in registry_name):
            raise ValueError(
                f"registry model name {registry_name!r} is not usable; set "
                "tracking.registry_name to a non-empty name without '/', e.g. 'n2n-student'"
            )
        self.uri = resolve_tracking_uri(tracking_uri)
        self.safe_uri = scrub_url(self.uri)
        if self.safe_uri != self.uri:
            # MLflow prints run links built from the URI to stdout, password included.
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        self.experiment = experiment
        self.registry_name = registry_name
        self.outbox = Outbox(retry or RetryPolicy())
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.children: list[dict[str, Any]] = []
        """Every child record logged so far, in arrival order: the rows of ``children.json``."""
        self._teacher: dict[str, Any] = {}
        self._dataset: str | None = None
        self._stages: dict[str, _Stage] = {}
        self._lock = threading.RLock()
        self._closed = False

    @functools.cached_property
    def client(self) -> mlflow.MlflowClient:
        """The MLflow client, made on first use (a SQLite client creates its file at once)."""
        return mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def _call(self, fn: Callable[[], T], what: str) -> T:
        return call_with_retries(fn, what, self.outbox.policy)

    # -- before the run -------------------------------------------------------------------

    def check_reachable(self) -> None:
        """Fails fast when MLflow cannot be used, so no Ray work starts for an untracked run.

        Raises:
            ValueError: one sentence naming the URI and the fix.
        """
        fix = (
            "start the server, pass another --tracking-uri (or MLFLOW_TRACKING_URI), or leave "
            f"both unset to log to {DEFAULT_TRACKING_URI} in the working directory"
        )
        scheme = urlsplit(self.uri).scheme
        if scheme in ("http", "https"):
            try:
                status = requests.get(f"{self.uri.rstrip('/')}/health", timeout=5).status_code
            except requests.RequestException as err:
                raise ValueError(
                    f"MLflow tracking server {self.safe_uri} is unreachable "
                    f"({type(err).__name__}); {fix}"
                ) from None
            if status >= 500:
                raise ValueError(f"MLflow at {self.safe_uri} answers /health with {status}; {fix}")
        elif scheme == "sqlite":
            path = sqlite_path(self.uri)
            folder = Path(path or ".").expanduser().resolve().parent
            if path not in (None, ":memory:") and not folder.is_dir():
                raise ValueError(
                    f"MLflow store {self.safe_uri} lies in {folder}, which does not exist; "
                    "create the folder or pass another --tracking-uri"
                )
        try:
            self.experiment_id = self._call(self._ensure_experiment, "find the experiment")
        except TrackingError as err:
            raise ValueError(f"MLflow at {self.safe_uri} cannot be used ({err}); {fix}") from None

    def _ensure_experiment(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None and found.lifecycle_stage == "deleted":
            raise ValueError(
                f"MLflow experiment {self.experiment!r} is deleted; restore it "
                "(mlflow experiments restore) or choose another tracking.experiment"
            )
        if found is not None:
            if EXPERIMENT_KIND[0] not in found.tags:
                self.client.set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment, tags=dict([EXPERIMENT_KIND]))
        except MlflowException as err:  # created at the same moment by another run
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(self.experiment).experiment_id

    def ui_url(self, run: bool = True) -> str | None:
        """The MLflow UI page of the parent run (or of the experiment), on the model-training
        view rather than the GenAI traces view MLflow 3 opens by default; None for a SQLite
        store (no server: open it with ``mlflow ui --backend-store-uri ...``)."""
        if urlsplit(self.uri).scheme not in ("http", "https") or self.experiment_id is None:
            return None
        page = f"#/experiments/{self.experiment_id}"
        if run and self.run_id:
            page += f"/runs/{self.run_id}"
        return f"{self.safe_uri.rstrip('/')}/{page}?{UI_VIEW}"

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
                (numbers become ``teacher/...`` metrics) and ``arch`` (a tag).
            dataset: the dataset name (tag ``n2n.dataset``, and a registry tag later).
            tags: run tags such as ``{"algo": "ppo", "stages": "removal,shrinkage"}``, logged
                as ``n2n.<key>``.
            run_name: the run's display name; defaults to the config's ``name``.

        Returns:
            The parent run id.

        Raises:
            TrackingError: MLflow stayed unreachable through all retries.
        """
        if self.run_id is not None:
            raise RuntimeError(f"this tracker already started run {self.run_id}")
        if self.experiment_id is None:
            self.experiment_id = self._call(self._ensure_experiment, "find the experiment")
        cfg = redact(config.model_dump(mode="json") if hasattr(config, "model_dump") else config)
        self._teacher, self._dataset = dict(teacher), dataset
        run_tags = {f"n2n.{k}": clip(scrub(str(v))) for k, v in redact(dict(tags or {})).items()}
        run_tags |= {"n2n.dataset": dataset, "mlflow.source.name": "n2n run"}
        if "arch" in teacher:
            run_tags["n2n.teacher"] = str(teacher["arch"])
        if commit := git_commit():
            run_tags["mlflow.source.git.commit"] = commit
        name = run_name or str(cfg.get("name") or "n2n")
        run = self._call(
            lambda: self.client.create_run(self.experiment_id, run_name=name, tags=run_tags),
            "create the parent run",
        )
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in flatten_config(cfg).items()]
        metrics = [
            Metric(f"teacher/{'accuracy' if k == 'test_accuracy' else k}", float(v), _now_ms(), 0)
            for k, v in teacher.items()
            if _finite(v)
        ]
        self._call(lambda: self.client.log_batch(self.run_id, metrics, params), "log the config")
        text = yaml.safe_dump(cfg, sort_keys=False)
        self._call(lambda: self.client.log_text(self.run_id, text, "config.yaml"), "log config")
        logger.info(
            "MLflow run %s, experiment %r at %s", self.run_id, self.experiment, self.safe_uri
        )
        return self.run_id

    def resume(
        self,
        run_id: str,
        config: Any,
        teacher: Mapping[str, Any],
        *,
        dataset: str,
        tags: Mapping[str, Any] | None = None,
        children: Sequence[Mapping[str, Any]] = (),
        iterations: Mapping[str, Sequence[tuple[int, Mapping[str, Any]]]] | None = None,
    ) -> str:
        """Continues the parent run of an interrupted search (``n2n run --resume``).

        The parent and its stage runs are set RUNNING again, so one search stays one MLflow
        run whatever the number of interruptions; a stage run that a killed driver had opened
        twice keeps its first copy and the other is ended KILLED. What the dead driver had
        not sent yet is sent now from the run directory's records: ``children`` (the rows of
        ``children.csv``) and ``iterations`` (per stage, ``(step, metrics)`` of
        ``iterations.csv``); steps already in MLflow are not logged twice. When the run is
        gone (deleted, or another tracking store), a new parent run is started instead.

        Returns:
            The parent run id.
        """
        if self.run_id is not None:
            raise RuntimeError(f"this tracker already started run {self.run_id}")
        try:
            run = self._call(lambda: self.client.get_run(run_id), "find the run to continue")
        except TrackingError as err:
            if err.transient:
                raise
            logger.warning("MLflow run %s cannot be continued (%s); starting a new one",
                           run_id, _first_line(err))  # fmt: skip
            return self.start(config, teacher, dataset=dataset, tags=tags)
        if run.info.lifecycle_stage == "deleted":
            logger.warning("MLflow run %s was deleted; starting a new one", run_id)
            return self.start(config, teacher, dataset=dataset, tags=tags)
        self.run_id, self.experiment_id = run_id, run.info.experiment_id
        self._teacher, self._dataset = dict(teacher), dataset
        resumed = int(run.data.tags.get("n2n.resumed", "0")) + 1
        self._call(lambda: self.client.update_run(run_id, status="RUNNING"), "reopen the run")
        self._call(lambda: self.client.set_tag(run_id, "n2n.resumed", str(resumed)), "tag")
        self._adopt_stages()
        by_stage: dict[str, int] = {}
        for record in children:
            self.children.append(
                {k: _cell(v) for k, v in record.items()} | {"error": str(record.get("error") or "")}
            )
            name = str(record.get("stage") or "search")
            by_stage[name] = by_stage.get(name, 0) + 1
        for name, rows in (iterations or {}).items():
            st = self._stage(name)
            st.iterations = [{"step": int(step), **_finite_values(m)} for step, m in rows]
        self.outbox.drain(strict=True)  # the adopted or created stage runs exist now
        for name, st in self._stages.items():
            st.children = by_stage.get(name, 0)
            self._backfill(st, [r for r in children if (r.get("stage") or "search") == name])
        if children:
            self.outbox.submit(f"upload {CHILDREN_TABLE}", self._upload_children, CHILDREN_TABLE)
        logger.info("continuing MLflow run %s (resumed %d times)", run_id, resumed)
        return run_id

    def _adopt_stages(self) -> None:
        """Takes over the stage runs of the continued parent; ends duplicates KILLED."""
        found = self._call(
            lambda: self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'",
                order_by=["attributes.start_time ASC"],
            ),
            "find the stage runs",
        )
        for run in found:
            name = run.data.tags.get("n2n.stage")
            if not name:
                continue
            if name in self._stages:  # a later copy opened by a driver that died early
                if run.info.status == "RUNNING":
                    rid = run.info.run_id
                    self._call(
                        lambda rid=rid: self.client.set_terminated(rid, "KILLED"), "end a copy"
                    )
                continue
            st = self._stages[name] = _Stage(name, run_id=run.info.run_id)
            st.ended = run.info.status == "FINISHED"
            if not st.ended:
                rid = run.info.run_id
                self._call(
                    lambda rid=rid: self.client.update_run(rid, status="RUNNING"), "reopen stage"
                )

    def _backfill(self, st: _Stage, children: Sequence[Mapping[str, Any]]) -> None:
        """Logs the iteration and child metrics of ``st`` that never reached MLflow."""
        if st.run_id is None:
            return
        rid = st.run_id

        def steps(key: str) -> set[int]:
            history = self._call(lambda: self.client.get_metric_history(rid, key), "read")
            return {m.step for m in history}

        have = steps("episodes/sampled")
        batch = [
            Metric(k, v, _now_ms(), it["step"])
            for it in st.iterations
            if it["step"] not in have
            for k, v in it.items()
            if k != "step"
        ]
        have = steps("child/reward")
        batch += [
            Metric(f"child/{key}", float(record[key]), _now_ms(), index)
            for index, record in enumerate(children)
            if index not in have
            for key in _CHILD_METRICS
            if _finite(record.get(key)) and not (key == "accuracy" and record.get("error"))
        ]
        for start in range(0, len(batch), 1000):  # MLflow's log_batch limit
            part = batch[start : start + 1000]
            self._call(lambda part=part: self.client.log_batch(rid, part), "log missed metrics")

    # -- during the search ----------------------------------------------------------------

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[str]:
        """A nested run for one search stage, ended FINISHED (KILLED on an interruption,
        FAILED on another exception).

        Yields:
            The stage name, the key for :meth:`log_iteration` and the ``stage`` of records.
        """
        self._stage(name)
        status = "FAILED"
        try:
            yield name
            status = "FINISHED"
        except KeyboardInterrupt:  # Ctrl+C or SIGTERM: the search can be resumed
            status = "KILLED"
            raise
        finally:
            self._end_stage(name, status)

    def log_iteration(self, stage: str, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs one search iteration's metrics (``reward/mean`` ...) as step ``step`` of a stage.

        Values that are None or not finite are skipped. Never raises for MLflow trouble: what
        cannot be sent now is sent with a later call.
        """
        values = _finite_values(metrics)
        with self._lock:
            st = self._stage(stage)
            st.iterations.append({"step": int(step), **values})
            batch = [Metric(k, v, _now_ms(), int(step)) for k, v in values.items()]
            self.outbox.submit(f"log iteration {step} of {stage}", lambda: self._log(st, batch))

    def log_children(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Records child evaluations: per-child metrics on the stage run, and the whole table.

        Each record is a row of ``children.csv`` (stage, episode, action, arch_hash, params,
        flops, compression, accuracy, reward, wall_time_s, cache_hit, error); a failed child
        keeps its ``error`` text and gets no accuracy point. Never raises for MLflow trouble:
        the table is re-sent whole from memory once MLflow answers again.
        """
        with self._lock:
            self._require_run()
            batches: dict[str, list[Metric]] = {}
            for record in records:
                row = {k: _cell(v) for k, v in record.items()} | {
                    "error": str(record.get("error") or "")
                }
                self.children.append(row)
                st = self._stage(str(record.get("stage") or "search"))
                for key in _CHILD_METRICS:
                    if _finite(record.get(key)) and not (key == "accuracy" and row["error"]):
                        metric = Metric(f"child/{key}", float(record[key]), _now_ms(), st.children)
                        batches.setdefault(st.name, []).append(metric)
                st.children += 1
            for name, batch in batches.items():
                st = self._stages[name]
                self.outbox.submit(
                    f"log {len(batch)} child metrics of {name}",
                    lambda st=st, batch=batch: self._log(st, batch),
                )
            if records:
                self.outbox.submit(
                    f"upload {CHILDREN_TABLE}", self._upload_children, CHILDREN_TABLE
                )

    def tune_callback(self, stage: str) -> Any:
        """A Ray Tune ``MLflowLoggerCallback`` whose trial runs nest under ``stage``'s run.

        Trial configs are redacted like the run config before they become params.
        """
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        with self._lock:
            st = self._stage(stage)
            self.outbox.drain(strict=True)

        class RedactingMLflowLoggerCallback(MLflowLoggerCallback):
            def setup(self, *args: Any, **kwargs: Any) -> None:
                super().setup(*args, **kwargs)
                log_params = self.mlflow_util.log_params

                def log_redacted(params_to_log: dict, run_id: str | None = None) -> None:
                    log_params(params_to_log=redact(params_to_log), run_id=run_id)

                self.mlflow_util.log_params = log_redacted

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
                Metric(name, float(r[key]), _now_ms(), int(r.get("index", i)))
                for i, r in enumerate(records)
                for key, name in keys.items()
                if _finite(r.get(key))
            ]
            self._call(lambda: self.client.log_batch(self.run_id, metrics), "log the students")
            rows = [{k: _cell(v) for k, v in r.items()} for r in records]
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
            teacher["accuracy"] = _accuracy(teacher)
            points = [
                {"name": r.get("label"), "params": r.get("params"), "accuracy": _accuracy(r)}
                for r in records
                if not r.get("error")
            ]
            fig = plots.pareto_figure(teacher, [], [], points)
            self._call(
                lambda: self.client.log_figure(self.run_id, fig, "plots/pareto.png"),
                "log plots/pareto.png",
            )

    def close(self, status: str = "FINISHED") -> None:
        """Sends what is still pending, then ends open stage runs and the parent with ``status``."""
        with self._lock:
            if self._closed or self.run_id is None:
                self._closed = True
                return
            self._closed = True
            for st in self._stages.values():
                if not st.ended:
                    self._end_stage(st.name, status)
            self.outbox.drain(strict=False)
            if len(self.outbox):
                logger.error(
                    "%d MLflow operations never reached %s (first: %s); the run directory "
                    "holds every record",
                    len(self.outbox), self.safe_uri, self.outbox.describe_pending(),
                )  # fmt: skip
            with contextlib.suppress(TrackingError):
                end = self.run_id
                self._call(lambda: self.client.set_terminated(end, status), "end the run")

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

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
            if _finite(student.get(k))
        ]
        if _finite(summary.get("compression_ratio")):
            metrics.append(Metric("compression/ratio", float(summary["compression_ratio"]), 0, 0))
        metrics = [Metric(m.key, m.value, _now_ms(), 0) for m in metrics]
        self._call(lambda: self.client.log_batch(self.run_id, metrics), "log the results")
        for obj, path in ((dict(summary), "summary.json"), (dict(spec), "student/spec.json")):
            self._call(lambda o=obj, p=path: self.client.log_dict(self.run_id, o, p), f"log {path}")
        rows = [{"name": "teacher", **summary.get("teacher", {})}]
        rows += self._students(summary)
        rows += [dict(b) for b in summary.get("baselines", [])]
        rows = [{k: _cell(v) for k, v in row.items()} for row in rows]
        self._call(lambda: self._log_table(rows, "results.json"), "log results.json")

    def _log_plots(self, summary: Mapping[str, Any]) -> None:
        teacher = {**self._teacher, **summary.get("teacher", {})}
        teacher["accuracy"] = _accuracy(teacher)
        students = [
            {"name": s["name"], "params": s.get("params"), "accuracy": _accuracy(s)}
            for s in self._students(summary)
        ]
        baselines = [{**b, "accuracy": _accuracy(b)} for b in summary.get("baselines", [])]
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
                "test_accuracy": _accuracy(student_facts),
                "teacher": arch,
                "teacher_params": teacher.get("params"),
                "teacher_test_accuracy": _accuracy(teacher),
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
                + (f" ({ratio:.1f}x fewer)" if _finite(ratio) else "")
                + f", test accuracy {_accuracy(student_facts)}. ONNX copy: {onnx_uri}"
            )
            registry.crown(self.client, self.registry_name, version, tags, description, self._call)
        return RegisteredStudent(
            self.run_id, info.model_uri, self.registry_name, version, onnx.max_abs_diff
        )

    # -- run bookkeeping ------------------------------------------------------------------

    def _require_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("call Tracker.start() before logging to a run")
        return self.run_id

    def _stage(self, name: str) -> _Stage:
        """The stage's record; its nested run is created through the outbox on first use."""
        with self._lock:
            self._require_run()
            if name not in self._stages:
                st = self._stages[name] = _Stage(name)
                self.outbox.submit(f"create the run of stage {name}", lambda: self._create(st))
            return self._stages[name]

    def _create(self, st: _Stage) -> None:
        if st.run_id is None:
            tags = {"mlflow.parentRunId": self.run_id, "n2n.stage": st.name}
            run = self.client.create_run(self.experiment_id, run_name=f"stage-{st.name}", tags=tags)
            st.run_id = run.info.run_id

    def _end_stage(self, name: str, status: str) -> None:
        with self._lock:
            st = self._stages[name]
            st.ended = True
            self.outbox.submit(f"end stage {name}", lambda: self._terminate(st, status))

    def _terminate(self, st: _Stage, status: str) -> None:
        if st.run_id is not None:
            self.client.set_terminated(st.run_id, status)

    def _log(self, st: _Stage, metrics: list[Metric]) -> None:
        self.client.log_batch(st.run_id or self.run_id, metrics=metrics)

    def _upload_children(self) -> None:
        self._log_table(self.children, CHILDREN_TABLE)

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
