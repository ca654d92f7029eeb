"""Continuing the MLflow records of an interrupted run (``n2n run --resume``).

:class:`Resuming` is the part of :class:`~pipeline.tracking.tracker.Tracker` that reopens a
parent run and its stage runs, adopts what a killed driver left RUNNING, and sends from the
run directory what the dead driver had not sent yet, without logging any step twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import mlflow
from mlflow.entities import Metric

from pipeline.tracking.outbox import TrackingError
from pipeline.tracking.results import (
    CHILD_METRICS,
    CHILDREN_TABLE,
    StageRun,
    finite,
    finite_values,
    first_line,
    now_ms,
)

logger = logging.getLogger(__name__)


class Resuming:
    """The resume side of :class:`~pipeline.tracking.tracker.Tracker` (mixed into it)."""

    client: mlflow.MlflowClient
    run_id: str | None
    experiment_id: str | None
    children: list[dict[str, Any]]
    outbox: Any
    _teacher: dict[str, Any]
    _dataset: str | None
    _stages: dict[str, Any]
    _call: Callable[..., Any]
    _stage: Callable[[str], Any]
    _log: Callable[..., None]
    _upload_children: Callable[[], None]
    start: Callable[..., str]

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
                           run_id, first_line(err))  # fmt: skip
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
            self.children.append(record)  # made a row on upload, as log_children's records
            name = str(record.get("stage") or "search")
            by_stage[name] = by_stage.get(name, 0) + 1
        for name, rows in (iterations or {}).items():
            st = self._stage(name)
            st.iterations = [{"step": int(step), **finite_values(m)} for step, m in rows]
        self.outbox.drain(strict=True)  # the adopted or created stage runs exist now
        for name, st in self._stages.items():
            st.children = by_stage.get(name, 0)
            self._backfill(st, [r for r in children if (r.get("stage") or "search") == name])
        if children:
            self.outbox.submit(f"upload {CHILDREN_TABLE}", self._upload_children, CHILDREN_TABLE)
        logger.info("continuing MLflow run %s (resumed %d times)", run_id, resumed)
        return run_id

    def _adopt_stages(self) -> None:
        """Takes over the stage runs of the continued parent (a stage run continued gets the
        ``n2n.resumed`` count too); ends duplicates KILLED."""
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
            st = self._stages[name] = StageRun(name, run_id=run.info.run_id)
            st.ended = run.info.status == "FINISHED"
            if not st.ended:  # continued: reopened and tagged like its parent
                rid, times = run.info.run_id, int(run.data.tags.get("n2n.resumed", "0")) + 1
                self._call(
                    lambda rid=rid: self.client.update_run(rid, status="RUNNING"), "reopen stage"
                )
                self._call(
                    lambda rid=rid, times=times: self.client.set_tag(
                        rid, "n2n.resumed", str(times)
                    ),
                    "tag a continued stage",
                )

    def _backfill(self, st: StageRun, children: Sequence[Mapping[str, Any]]) -> None:
        """Logs the iteration and child metrics of ``st`` that never reached MLflow."""
        if st.run_id is None:
            return
        rid = st.run_id

        def steps(key: str) -> set[int]:
            history = self._call(lambda: self.client.get_metric_history(rid, key), "read")
            return {m.step for m in history}

        have = steps("episodes/sampled")
        batch = [
            Metric(k, v, now_ms(), it["step"])
            for it in st.iterations
            if it["step"] not in have
            for k, v in it.items()
            if k != "step"
        ]
        have = steps("child/reward")
        batch += [
            Metric(f"child/{key}", float(record[key]), now_ms(), index)
            for index, record in enumerate(children)
            if index not in have
            for key in CHILD_METRICS
            if finite(record.get(key)) and not (key == "accuracy" and record.get("error"))
        ]
        for start in range(0, len(batch), 1000):  # MLflow's log_batch limit
            part = batch[start : start + 1000]
            self._call(lambda part=part: self.client.log_batch(rid, part), "log missed metrics")
