"""MLflow tracking of one run: the parent run, a nested run per stage, the children.

What a run leaves in MLflow: a parent run with the whole validated config as params (secrets
redacted, ``pipeline.tracking.redaction``), the git commit, the dataset, the teacher's metrics
(``teacher/params``, ``teacher/accuracy`` ...) and ``config.yaml``; one nested run per search
stage with per-iteration metrics as steps (``reward/mean``, ``best/compression``,
``children/evaluated`` ...) and per-child metrics (``child/reward``, ``child/accuracy`` ...)
stepped by the child's index; ``children.json``, every child in one table
(``mlflow.log_table``'s format, a failed child with its error); and at the end what
``pipeline.tracking.results`` logs (plots, results, the registered student). A resumed run
continues the same runs (``pipeline.tracking.resume``).

Tracking must not cost a search its results: what is logged during the search goes through an
:class:`~pipeline.tracking.outbox.Outbox`, so an outage of the tracking server delays records
and loses none. :meth:`Tracker.start` and :meth:`Tracker.finish` raise
:class:`~pipeline.tracking.outbox.TrackingError` when MLflow stays unreachable, since a run
without them is not tracked at all.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import yaml
from mlflow.entities import Metric, Param

from pipeline.config.schema import RunConfig
from pipeline.tracking.connection import (
    LOCAL_UI,
    UNREACHABLE_FIX,
    check_store,
    ensure_experiment,
    ui_url,
)
from pipeline.tracking.outbox import Outbox, RetryPolicy, TrackingError, call_with_retries
from pipeline.tracking.redaction import clip, flatten_config, redact, scrub, scrub_url
from pipeline.tracking.registry import CHAMPION_ALIAS, RegisteredStudent
from pipeline.tracking.results import (
    CHILD_METRICS,
    CHILDREN_TABLE,
    ResultLogging,
    StageRun,
    cell,
    finite,
    finite_values,
    now_ms,
)
from pipeline.tracking.resume import Resuming
from pipeline.tracking.store import resolve_tracking_uri, sqlite_path

logger = logging.getLogger(__name__)

T = TypeVar("T")


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


class Tracker(Resuming, ResultLogging):
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
        self._stages: dict[str, StageRun] = {}
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
        check_store(self.uri, self.safe_uri)
        try:
            self.experiment_id = self._call(
                lambda: ensure_experiment(self.client, self.experiment), "find the experiment"
            )
        except TrackingError as err:
            raise ValueError(
                f"MLflow at {self.safe_uri} cannot be used ({err}); {UNREACHABLE_FIX}"
            ) from None

    def where_to_look(self) -> str:
        """Where to see this run in MLflow's UI: its page on a tracking server, or for a SQLite
        store the ``mlflow ui`` command and the page it then serves."""
        if url := self.ui_url():
            return url
        if sqlite_path(self.uri) is None:
            return f"the run {self.run_id} in {self.safe_uri}"
        page = ui_url(LOCAL_UI, self.experiment_id, self.run_id)
        return f"mlflow ui --backend-store-uri {self.safe_uri}, then open {page}"

    def ui_url(self, run: bool = True) -> str | None:
        """The MLflow UI page of the parent run (or of the experiment), on the model-training
        view (see ``pipeline.tracking.connection.ui_url``)."""
        return ui_url(self.safe_uri, self.experiment_id, self.run_id if run else None)

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
            self.experiment_id = self._call(
                lambda: ensure_experiment(self.client, self.experiment), "find the experiment"
            )
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
            Metric(f"teacher/{'accuracy' if k == 'test_accuracy' else k}", float(v), now_ms(), 0)
            for k, v in teacher.items()
            if finite(v)
        ]
        self._call(lambda: self.client.log_batch(self.run_id, metrics, params), "log the config")
        text = yaml.safe_dump(cfg, sort_keys=False)
        self._call(lambda: self.client.log_text(self.run_id, text, "config.yaml"), "log config")
        logger.info(
            "MLflow run %s, experiment %r at %s", self.run_id, self.experiment, self.safe_uri
        )
        return self.run_id

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
        values = finite_values(metrics)
        with self._lock:
            st = self._stage(stage)
            st.iterations.append({"step": int(step), **values})
            batch = [Metric(k, v, now_ms(), int(step)) for k, v in values.items()]
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
                self.children.append(record)  # the caller's record, made a row on upload
                st = self._stage(str(record.get("stage") or "search"))
                for key in CHILD_METRICS:
                    if finite(record.get(key)) and not (key == "accuracy" and record.get("error")):
                        metric = Metric(f"child/{key}", float(record[key]), now_ms(), st.children)
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

    # -- the end --------------------------------------------------------------------------

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

    # -- run bookkeeping ------------------------------------------------------------------

    def _require_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("call Tracker.start() before logging to a run")
        return self.run_id

    def _stage(self, name: str) -> StageRun:
        """The stage's record; its nested run is created through the outbox on first use."""
        with self._lock:
            self._require_run()
            if name not in self._stages:
                st = self._stages[name] = StageRun(name)
                self.outbox.submit(f"create the run of stage {name}", lambda: self._create(st))
            return self._stages[name]

    def _create(self, st: StageRun) -> None:
        if st.run_id is None:
            tags = {"mlflow.parentRunId": self.run_id, "n2n.stage": st.name}
            run = self.client.create_run(self.experiment_id, run_name=f"stage-{st.name}", tags=tags)
            st.run_id = run.info.run_id

    def _end_stage(self, name: str, status: str) -> None:
        with self._lock:
            st = self._stages[name]
            st.ended = True
            self.outbox.submit(f"end stage {name}", lambda: self._terminate(st, status))

    def _terminate(self, st: StageRun, status: str) -> None:
        if st.run_id is not None:
            self.client.set_terminated(st.run_id, status)

    def _log(self, st: StageRun, metrics: list[Metric]) -> None:
        self.client.log_batch(st.run_id or self.run_id, metrics=metrics)

    def _upload_children(self) -> None:
        records = list(self.children)  # a snapshot (one C-level copy, atomic under the GIL)
        rows = [{k: cell(v) for k, v in r.items()} | {"error": str(r.get("error") or "")}
                for r in records]  # fmt: skip
        self._log_table(rows, CHILDREN_TABLE)


def tracker_for(cfg: RunConfig, register: bool = True) -> Tracker | None:
    """An MLflow tracker that has been checked to work, or None when tracking is off.

    ``register=False`` gives a tracker that logs a student without registering it.
    """
    if not cfg.tracking.enabled:
        return None
    registry_name = (cfg.tracking.registry_name or f"n2n-{cfg.name}") if register else None
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, registry_name)
    tracker.check_reachable()
    return tracker
