"""The whole ``n2n run`` job: teacher -> removal search -> shrinkage search -> fine-tuning.

Reads top to bottom like the job itself:

1. :func:`init_ray` joins a cluster (``ray.address``) or starts a local one sized to the
   machine; :func:`load_splits` and :func:`prepare_teacher` load the data and the teacher
   (training one on the fly into ``RUN_DIR/teacher`` when no checkpoint is given);
2. :func:`make_evaluator` prepares the knowledge-distillation evaluator once (data and
   teacher logits in the object store, the reward cache in ``RUN_DIR/cache.sqlite``);
3. :func:`search_stage` runs stage 1 (removal) and stage 2 (shrinkage, starting from stage
   1's best child) as Tune trials (``pipeline.search.trial``), either stage skippable;
4. :func:`finetune` trains the top-k distinct students longer, as parallel Ray tasks, and
   measures them once on the test split; the best by validation reward becomes ``best/``;
5. ``summary.json``: teacher vs student params, FLOPs, size, test accuracy, compression.

``resume=True`` continues a run directory: finished steps are skipped (``state.json``),
an interrupted stage continues from its Tune checkpoints, and the reward cache answers for
every child already trained, so none is trained twice.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from rich.console import Console

from envs.checkpoint import load_checkpoint
from pipeline.cluster.runtime import check_resources, init_ray
from pipeline.config.errors import NoFeasibleStudent
from pipeline.config.schema import RunConfig
from pipeline.data.datasets import Splits, load_splits
from pipeline.data.teachers import Teacher, prepare_teacher
from pipeline.job.context import Job, log_name
from pipeline.job.finetune import finetune, top_candidates, within
from pipeline.job.sparsity import sparse_source
from pipeline.job.stages import best_row, make_evaluator, rebuild_child, search_stage, stage_start
from pipeline.search.records import STAGES, child_log
from pipeline.search.transfer import check_transfer, source_record
from pipeline.tracking.progress import Clock, tracked_metrics
from pipeline.tracking.rundir import RunDir
from pipeline.tracking.tracker import Tracker

logger = logging.getLogger(__name__)


def open_job(
    cfg: RunConfig,
    run_dir: RunDir,
    console: Console | None,
    tracker: Tracker | None,
    splits: Splits | None,
    planned: int,
) -> Job:
    """Data, teacher, tracking, evaluator and child log of a run (Ray must be running)."""
    splits = splits if splits is not None else load_splits(cfg)
    teacher = prepare_teacher(cfg, splits, run_dir.file("teacher"), progress=console is not None)
    if tracker is not None:
        _open_tracking(cfg, run_dir, tracker, teacher)
    job = Job(
        cfg=cfg, run_dir=run_dir, splits=splits, teacher=teacher, evaluator=("", {}),
        evaluator_instance=None, console=console, tracker=tracker,
        clock=Clock(planned, done_before=len(run_dir.iterations())), log_name=log_name(run_dir),
    )  # fmt: skip
    job.evaluator, job.evaluator_instance = make_evaluator(cfg, teacher, run_dir)
    job.log = child_log(job.log_name)
    f = teacher.facts
    job.say(
        f"teacher {f['arch']}: {f['params']:,} params, {f['flops']:,} FLOPs, "
        f"val {f['val_accuracy']:.4f}, test {f['test_accuracy']:.4f}"
    )
    job.limits = cfg.budget.limits(f["params"], f["flops"])
    if job.limits:
        asked = ", ".join(f"{key} <= {n:,}" for key, n in job.limits.items())
        job.say(f"[bold]budget[/]: {asked} (reward {job.reward()['name']})")
    if cfg.search.sparsity_steps > 0:
        job.source = sparse_source(job)
    job.policies = check_transfer(cfg)
    if job.policies:
        how = "evaluated as it is" if cfg.search.freeze_policy else "trained on from there"
        job.say(f"[bold]policy[/]: from {cfg.search.policy_from} ({how})")
    return job


def _open_tracking(cfg: RunConfig, run_dir: RunDir, tracker: Tracker, teacher: Teacher) -> None:
    """Starts the MLflow parent run, or continues the one a resumed run already had."""
    stages = [s for s in STAGES if cfg.stage(s).enabled]
    args = (cfg.model_dump(mode="json"), teacher.facts)
    tags = {"algo": cfg.search.algo, "policy": cfg.search.policy, "stages": ",".join(stages)}
    limits = cfg.budget.limits(teacher.facts["params"], teacher.facts["flops"])
    if limits:
        tags["budget"] = ", ".join(f"{key} <= {n}" for key, n in limits.items())
    if source := transfer_record(cfg):
        tags["policy_from"] = source["run_dir"]
        tags["policy_from_run"] = source["mlflow_run_id"] or ""
        tags["policy_frozen"] = str(source["frozen"]).lower()
    kwargs = {"dataset": cfg.data.name, "tags": tags}
    earlier = run_dir.state().get("mlflow") or {}
    if earlier.get("run_id") and earlier.get("uri") == tracker.safe_uri:
        iterations: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        for row in run_dir.iterations():
            iterations.setdefault(row["stage"], []).append(
                (int(row["iteration"]), tracked_metrics(_numbers(row)))
            )
        tracker.resume(
            earlier["run_id"], *args, children=run_dir.children(), iterations=iterations, **kwargs
        )
    else:
        tracker.start(*args, **kwargs)
    run_dir.remember("mlflow", {"run_id": tracker.run_id, "uri": tracker.safe_uri})


def _numbers(row: dict[str, str]) -> dict[str, Any]:
    """An ``iterations.csv`` row with its numeric cells as floats."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            out[key] = value
    return out


def release(job: Job | None) -> None:
    """Kills the run's actors (child log, reward cache) so that a later run starts clean."""
    if job is None:
        return
    if job.log is not None:
        ray.kill(job.log)
    if hasattr(job.evaluator_instance, "close"):
        job.evaluator_instance.close()


def run(
    cfg: RunConfig,
    resume: bool = False,
    console: Console | None = None,
    tracker: Tracker | None = None,
    splits: Splits | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) a whole compression job in ``cfg.output.run_dir``; returns the summary.

    ``cfg`` must have resolved paths (``RunConfig.resolve_paths``). Ray is started when it is
    not running yet, and stopped again at the end if this call started it. ``splits`` (the
    loaded dataset) saves loading it twice when the caller already checked it.
    """
    started = time.monotonic()
    run_dir = RunDir(cfg.output.run_dir)
    if resume:
        if run_dir.done("finetune") and run_dir.file("summary.json").is_file():
            logger.info("run %s is complete; nothing to resume", run_dir.path)
            return run_dir.summary()
        if dropped := run_dir.drop_uncommitted():
            logger.info("dropped %d child records of an uncommitted iteration", dropped)
    owns_ray = init_ray(cfg)
    job: Job | None = None
    try:
        check_resources(cfg)
        if not resume:  # the run directory exists once the run could start
            run_dir.write_config(cfg.to_yaml())
        planned = sum(cfg.stage(s).iterations for s in STAGES if cfg.stage(s).enabled)
        job = open_job(cfg, run_dir, console, tracker, splits, planned)
        all_rows: list[dict[str, Any]] = []
        start: str | None = None
        parent = None
        for stage in STAGES:
            if not cfg.stage(stage).enabled:
                continue
            if run_dir.done(stage):
                rows = run_dir.children(stage)
                job.say(f"[bold]{stage}[/]: finished before ({len(rows)} children)")
            elif tracker is not None:
                with tracker.stage(stage):
                    rows = search_stage(job, stage, start, resume)
            else:
                rows = search_stage(job, stage, start, resume)
            all_rows += rows
            best = best_row(rows)
            run_dir.mark(stage, children=len(rows), best=best and best["arch_hash"])
            if stage == "removal":
                start, parent = stage_start(job, rows)
        run_dir.write_pareto(all_rows)
        try:
            candidates = top_candidates(all_rows, cfg.finetune.top_k, job.limits)
        except NoFeasibleStudent:
            run_dir.write_summary(_infeasible_summary(job, all_rows, time.monotonic() - started))
            raise
        built = [rebuild_child(job, row, parent) for row in candidates]
        students = finetune(job, candidates, built)
        run_dir.mark("finetune", students=len(students))
        summary = _summary(job, all_rows, students, time.monotonic() - started)
        run_dir.write_summary(summary)
        if tracker is not None:
            ckpt = load_checkpoint(run_dir.file("best"))
            tracker.finish(
                run_dir.path, ckpt.model, ckpt.spec, summary, example_inputs=job.splits.test[0][:8]
            )
        return summary
    finally:
        release(job)
        if owns_ray:
            ray.shutdown()


def _summary(
    job: Job, rows: list[dict[str, Any]], students: list[dict[str, Any]], wall: float
) -> dict[str, Any]:
    """``summary.json``: teacher vs the best student, and how the search went."""
    keys = ("params", "flops", "size_bytes", "val_accuracy", "test_accuracy")
    teacher = {k: job.teacher.facts[k] for k in (*keys, "arch")}
    best = next(s for s in students if s.get("best"))
    student = {k: best[k] for k in (*keys, "arch_hash", "stage", "reward", "compression")}
    # The record every method reports (see pipeline.baselines.run): a search student is dense.
    student |= {
        "nonzero_params": student["params"],
        "delta": student["test_accuracy"] - teacher["test_accuracy"],
        "child_evaluations": len(rows),
        "wall_time_s": round(wall, 1),
    }
    instance = job.evaluator_instance
    cache = instance.cache_stats() if hasattr(instance, "cache_stats") else {}
    # Children whose task was lost with its worker or node and run again (pipeline.children.evaluator).
    retries = [int(r.get("retries") or 0) for r in rows]
    warnings = list(job.warnings)
    if any(retries):
        retried, total = sum(n > 0 for n in retries), sum(retries)
        warnings.append(
            f"{retried} child{'ren' * (retried > 1)} lost {'their' if retried > 1 else 'its'} "
            f"worker or node and ran again ({total} retr{'ies' if total > 1 else 'y'} in all; "
            "see the retries column of children.csv)"
        )
    return {
        "name": job.cfg.name,
        "dataset": job.cfg.data.name,
        "algo": job.cfg.search.algo,
        "budget": budget_report(job.limits, student),
        "cost": training_cost(job, rows, students),
        "policy_from": transfer_record(job.cfg),
        "teacher": teacher,
        "student": student,
        "students": students,
        "compression_ratio": teacher["params"] / max(student["params"], 1),
        "flops_ratio": teacher["flops"] / max(student["flops"], 1),
        "children": {
            "evaluated": len(rows),
            "distinct": len({r["arch_hash"] for r in rows if r.get("arch_hash")}),
            "cache_hits": sum(1 for r in rows if r.get("cache_hit")),
            "failed": sum(1 for r in rows if r.get("error")),
            "retried": sum(n > 0 for n in retries),
            "retries": sum(retries),
        },
        "cache": {k: v for k, v in cache.items() if k != "path"},
        "warnings": warnings,
        "wall_time_s": round(wall, 1),
    }


def budget_report(limits: dict[str, int], student: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the summary says of the budget: the limits, whether the student met them, and by
    how much (``margin``: the share of each limit left unused; negative when over)."""
    if not limits:
        return None
    report: dict[str, Any] = {"limits": dict(limits), "met": False, "margin": {}}
    if student is not None:
        report["met"] = within(student, limits)
        report["margin"] = {key: 1 - student[key] / n for key, n in limits.items()}
    return report


def _infeasible_summary(job: Job, rows: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """``summary.json`` of a search that found no student within its budget."""
    keys = ("params", "flops", "size_bytes", "val_accuracy", "test_accuracy", "arch")
    good = [r for r in rows if r.get("params")]
    return {
        "name": job.cfg.name,
        "dataset": job.cfg.data.name,
        "algo": job.cfg.search.algo,
        "budget": budget_report(job.limits, None),
        "teacher": {k: job.teacher.facts[k] for k in keys},
        "student": None,
        "students": [],
        "smallest_child": min(good, key=lambda r: r["params"])["params"] if good else None,
        "children": {"evaluated": len(rows)},
        "cost": training_cost(job, rows, []),
        "wall_time_s": round(wall, 1),
    }


def training_cost(
    job: Job, rows: list[dict[str, Any]], students: list[dict[str, Any]]
) -> dict[str, int]:
    """What the run trained, to compare methods at their cost: KD steps of every child trained
    (cache hits cost nothing), of the sparsity phase and of the fine-tuned students, and the
    teacher's forward passes (its cached logits count once per training image)."""
    children = sum(int(r.get("kd_steps") or 0) for r in rows if not r.get("cache_hit"))
    sparsity = int((job.source.facts.get("kd_steps") or 0) if job.source else 0)
    finetuning = sum(int(s.get("kd_steps") or 0) for s in students)
    forwards = len(job.splits.train[1]) + sum(int(s.get("teacher_forwards") or 0) for s in students)
    return {
        "kd_steps": children + sparsity + finetuning,
        "kd_steps_children": children,
        "kd_steps_students": finetuning + sparsity,
        "teacher_forwards": forwards,
    }


def transfer_record(cfg: RunConfig) -> dict[str, Any] | None:
    """Where the run's policies came from (``search.policy_from``), or None."""
    if cfg.search.policy_from is None:
        return None
    return {**source_record(cfg.search.policy_from), "frozen": cfg.search.freeze_policy}
