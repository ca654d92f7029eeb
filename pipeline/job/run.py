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

import hashlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from rich.console import Console
from torch import nn

from envs.checkpoint import load_checkpoint, save_checkpoint
from envs.costs import model_costs
from envs.env import load_network
from envs.evaluation import load_evaluator
from envs.spec import arch_hash
from envs.surgery import make_child
from pipeline.config.schema import RunConfig
from pipeline.job.finetune import finetune, top_candidates
from pipeline.search.trial import (
    ENV_CLASSES,
    STAGES,
    child_log,
    run_stage,
    runner_cpus,
    stage_settings,
)
from pipeline.tracking.progress import Clock, StageMonitor, tracked_metrics
from pipeline.tracking.rundir import RunDir, ok

logger = logging.getLogger(__name__)

KD_EVALUATOR = "pipeline.children.evaluator:KDEvaluator"


@dataclass
class Teacher:
    """The network being compressed and what it costs."""

    path: Path
    model: nn.Module
    spec: dict[str, Any]
    facts: dict[str, Any]
    """``params``, ``flops``, ``size_bytes``, ``val_accuracy``, ``test_accuracy``, ``arch``."""


@dataclass
class Job:
    """Everything one run shares between its steps."""

    cfg: RunConfig
    run_dir: RunDir
    splits: Any
    teacher: Teacher
    evaluator: tuple[str, dict[str, Any]]
    """Import path and kwargs of the child evaluator, as the envs receive them."""
    evaluator_instance: Any
    console: Console | None
    tracker: Any
    clock: Clock
    log_name: str
    log: Any = None
    warnings: list[str] = field(default_factory=list)

    def say(self, text: str) -> None:
        """A progress message: on the console when there is one, else in the log."""
        if self.console is not None:
            self.console.print(text, highlight=False)
        else:
            logger.info(text.replace("[bold]", "").replace("[/]", ""))


# --------------------------------------------------------------------------- set-up


def init_ray(cfg: RunConfig) -> bool:
    """Joins ``ray.address`` or starts a local cluster; returns whether it started Ray.

    Ray puts the driver's working directory on its workers' ``sys.path`` (on this machine), so
    a custom ``teacher.arch`` or evaluator module there reaches the env runners and child tasks
    without a runtime_env; a remote cluster needs it in the image or the job's working_dir.
    """
    if ray.is_initialized():
        return False
    before = signal.getsignal(signal.SIGTERM)
    if address := ray_address(cfg):
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(
            num_cpus=cfg.ray.num_cpus,
            num_gpus=cfg.ray.num_gpus,
            object_store_memory=cfg.ray.object_store_mb * 1024**2,
            include_dashboard=False,
            log_to_driver=False,
        )
    if callable(before) and threading.current_thread() is threading.main_thread():
        # ray.init replaces a SIGTERM handler (the CLI's, which stops like Ctrl+C) with one
        # that exits at once, behind a stack dump: keep the caller's.
        signal.signal(signal.SIGTERM, before)
    return True


def ray_address(cfg: RunConfig) -> str | None:
    """The cluster to join: ``ray.address``, else ``RAY_ADDRESS`` (set in a Ray job's driver,
    as ``ray.init()`` itself would use it), else None for a new local cluster."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def check_resources(cfg: RunConfig) -> None:
    """Fails when a local cluster cannot hold one stage trial plus one child task at once.

    A joined cluster (``ray.address``) may autoscale, so there a shortfall is only a warning.
    """
    have = ray.cluster_resources()
    need_cpu = runner_cpus(cfg.search.env_runners) * (1 + cfg.search.env_runners)
    need_cpu += cfg.ray.cpus_per_child
    problems = []
    if have.get("CPU", 0) + 1e-9 < need_cpu:
        problems.append(
            f"the Ray cluster has {have.get('CPU', 0):g} CPUs but a search with "
            f"{cfg.search.env_runners} env runners and ray.cpus_per_child={cfg.ray.cpus_per_child:g} "
            f"needs {need_cpu:g}; lower ray.cpus_per_child or search.env_runners"
        )
    if cfg.ray.gpus_per_child > have.get("GPU", 0):
        problems.append(
            f"ray.gpus_per_child={cfg.ray.gpus_per_child:g} but the cluster has "
            f"{have.get('GPU', 0):g} GPUs; set ray.gpus_per_child=0 to train children on CPUs"
        )
    if problems and not ray_address(cfg):
        raise ValueError(problems[0])
    for problem in problems:
        logger.warning("%s (waiting for the cluster to scale up)", problem)


def load_splits(cfg: RunConfig) -> Any:
    """The dataset, split into train / val (rewards) / test (final report only)."""
    from pipeline.data.datasets import load_dataset

    return load_dataset(**cfg.data.as_kwargs(cfg.seed))


def prepare_teacher(
    cfg: RunConfig,
    run_dir: RunDir,
    splits: Any,
    console: Console | None,
    folder: Path | None = None,
) -> Teacher:
    """Loads ``teacher.checkpoint``, or the run's own teacher, or trains one into ``RUN_DIR/teacher``.

    ``folder`` overrides where a teacher trained here is saved (``n2n teacher --out``).
    """
    from pipeline.children.distill import evaluate_accuracy
    from pipeline.data.teachers import TeacherConfig, load_teacher, train_teacher

    path = (
        Path(cfg.teacher.checkpoint)
        if cfg.teacher.checkpoint
        else (folder or run_dir.file("teacher"))
    )
    if cfg.teacher.checkpoint is None and not (path / "weights.pt").is_file():
        t = cfg.teacher
        settings = TeacherConfig(
            epochs=t.epochs, batch_size=t.batch_size, optimizer=t.optimizer, lr=t.lr,
            weight_decay=t.weight_decay, augment=t.augment, seed=cfg.seed, device=t.device,
        )  # fmt: skip
        train_teacher(t.arch_spec(), splits, settings, out_dir=path, progress=console is not None)
    checkpoint = load_teacher(path, splits)
    model = checkpoint.model.eval()
    facts = dict(model_costs(model, splits.input_shape).as_dict())
    metrics = checkpoint.metrics
    for key, part in (("val_accuracy", splits.val), ("test_accuracy", splits.test)):
        facts[key] = float(metrics[key]) if key in metrics else evaluate_accuracy(model, *part)
    facts["arch"] = checkpoint.spec["base"]["arch"]
    return Teacher(path=path.resolve(), model=model, spec=checkpoint.spec, facts=facts)


def make_evaluator(
    cfg: RunConfig, teacher: Teacher, run_dir: RunDir
) -> tuple[tuple[str, dict[str, Any]], Any]:
    """The child evaluator as (import path, kwargs) for env_config, and the driver's instance.

    The KD evaluator is prepared here, once: its data and teacher logits go to the object
    store and its reward cache persists in ``RUN_DIR/cache.sqlite``.
    """
    path = cfg.search.evaluator
    if path != KD_EVALUATOR:
        instance = load_evaluator(path, dict(cfg.search.evaluator_kwargs))
        return (path, dict(cfg.search.evaluator_kwargs)), instance
    from pipeline.children.evaluator import KDEvaluator

    kwargs = {
        "teacher": str(teacher.path),
        "dataset": cfg.data.as_kwargs(cfg.seed),
        "distill": cfg.distill.as_kwargs(cfg.seed),
        "num_cpus": cfg.ray.cpus_per_child,
        "num_gpus": cfg.ray.gpus_per_child,
        "timeout_s": cfg.distill.timeout_s,
        "cache_path": str(run_dir.file("cache.sqlite")),
        "early_stop": cfg.distill.early_stop_kwargs(cfg.finetune.top_k),
        "val_subset": cfg.distill.val_subset,
        **cfg.search.evaluator_kwargs,
    }
    latency_budget = cfg.reward.name == "constrained" and "latency" in cfg.reward.budgets
    if kwargs["early_stop"] and latency_budget:
        logger.warning(
            "distill.early_stop is off: a latency budget needs each child's latency, which is "
            "measured only after its training"
        )
        kwargs["early_stop"] = None
    instance = KDEvaluator(**kwargs).prepare()
    return (path, instance.config()), instance


def env_config(
    job: Job, stage: str, start: str | None, cfg: RunConfig | None = None
) -> dict[str, Any]:
    """The env_config of a stage's environments (for ``cfg``, default the job's config)."""
    cfg = cfg or job.cfg
    config: dict[str, Any] = {
        "teacher": str(job.teacher.path),
        "evaluator": job.evaluator[0],
        "evaluator_config": job.evaluator[1],
        "reward": cfg.reward.as_env_config(),
    }
    if stage == "shrinkage":
        s = cfg.shrinkage
        config.update(
            ratios=list(s.ratios), min_channels=s.min_channels, importance=s.importance,
            sequential=s.sequential, start=start,
        )  # fmt: skip
    return config


# --------------------------------------------------------------------------- search


def search_stage(job: Job, stage: str, start: str | None, resume: bool) -> list[dict[str, Any]]:
    """Runs (or resumes) one search stage under Tune; returns all its child records."""
    cfg = job.cfg
    config = env_config(job, stage, start)
    probe = ENV_CLASSES[stage](config)  # validates the env config before any trial starts
    units = len(probe.units)
    choices = 2 if stage == "removal" else len(cfg.shrinkage.ratios)
    probe.close()
    settings = stage_settings(
        stage, cfg.search, cfg.stage(stage), config, units, choices, cfg.seed, job.log_name,
        cfg.rollout_timeout_s(stage),
    )  # fmt: skip
    monitor = StageMonitor(stage, job.log, job.run_dir, job.clock, job.console, job.tracker)
    job.say(
        f"[bold]{stage}[/]: {cfg.search.algo} with a {cfg.search.policy} policy over {units} units, "
        f"{cfg.stage(stage).iterations} iterations x {cfg.stage(stage).episodes_per_iteration} children"
    )
    run_stage(stage, [settings], cfg.output.storage_path, [monitor.callback()], resume=resume)
    job.warnings += monitor.warnings
    return monitor.all_rows


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The successful child with the highest reward."""
    return max((r for r in rows if ok(r)), key=lambda r: r["reward"], default=None)


def rebuild_child(
    job: Job, row: dict[str, Any], parent: tuple[nn.Module, dict[str, Any]] | None
) -> tuple[nn.Module, dict[str, Any]]:
    """The child of a record, rebuilt by surgery with the teacher's (or parent's) weights."""
    if row["stage"] == "removal":
        model, spec = make_child(
            job.teacher.model, job.teacher.spec, remove=row.get("removed") or []
        )
    else:
        base_model, base_spec = parent or (job.teacher.model, job.teacher.spec)
        s = job.cfg.shrinkage
        model, spec = make_child(
            base_model, base_spec, ratios=row.get("ratios") or {}, min_channels=s.min_channels,
            importance=s.importance,
        )  # fmt: skip
    if row.get("arch_hash") and arch_hash(spec) != row["arch_hash"]:
        raise RuntimeError(
            f"rebuilding child {row['arch_hash']} of {row['stage']} gave {arch_hash(spec)}; "
            "the surgery is not deterministic"
        )
    return model, spec


# --------------------------------------------------------------------------- the job


def _log_name(run_dir: RunDir) -> str:
    return "children-" + hashlib.sha1(str(run_dir.path.resolve()).encode()).hexdigest()[:12]


def _stage_start(
    job: Job, rows: list[dict[str, Any]]
) -> tuple[str | None, tuple[nn.Module, dict[str, Any]] | None]:
    """Where stage 2 starts: stage 1's best child (saved with the teacher's weights), or the teacher."""
    best = best_row(rows)
    if best is None or best["reward"] <= 0:
        return None, None
    folder = job.run_dir.file("removal_best")
    model, spec = rebuild_child(job, best, None)
    save_checkpoint(
        folder,
        model,
        spec,
        {k: best[k] for k in ("arch_hash", "reward", "accuracy", "compression")},
    )
    return str(folder), load_network(str(folder), "start")


def _open_job(
    cfg: RunConfig,
    run_dir: RunDir,
    console: Console | None,
    tracker: Any,
    splits: Any,
    planned: int,
) -> Job:
    """Data, teacher, tracking, evaluator and child log of a run (Ray must be running)."""
    splits = splits if splits is not None else load_splits(cfg)
    teacher = prepare_teacher(cfg, run_dir, splits, console)
    if tracker is not None:
        _open_tracking(cfg, run_dir, tracker, teacher)
    job = Job(
        cfg=cfg, run_dir=run_dir, splits=splits, teacher=teacher, evaluator=("", {}),
        evaluator_instance=None, console=console, tracker=tracker,
        clock=Clock(planned, done_before=len(run_dir.iterations())), log_name=_log_name(run_dir),
    )  # fmt: skip
    job.evaluator, job.evaluator_instance = make_evaluator(cfg, teacher, run_dir)
    job.log = child_log(job.log_name)
    f = teacher.facts
    job.say(
        f"teacher {f['arch']}: {f['params']:,} params, {f['flops']:,} FLOPs, "
        f"val {f['val_accuracy']:.4f}, test {f['test_accuracy']:.4f}"
    )
    return job


def _open_tracking(cfg: RunConfig, run_dir: RunDir, tracker: Any, teacher: Teacher) -> None:
    """Starts the MLflow parent run, or continues the one a resumed run already had."""
    stages = [s for s in STAGES if cfg.stage(s).enabled]
    args = (cfg.model_dump(mode="json"), teacher.facts)
    kwargs = {
        "dataset": cfg.data.name,
        "tags": {"algo": cfg.search.algo, "policy": cfg.search.policy, "stages": ",".join(stages)},
    }
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


def _release(job: Job | None) -> None:
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
    tracker: Any = None,
    splits: Any = None,
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
        job = _open_job(cfg, run_dir, console, tracker, splits, planned)
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
                start, parent = _stage_start(job, rows)
        run_dir.write_pareto(all_rows)
        candidates = top_candidates(all_rows, cfg.finetune.top_k)
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
        _release(job)
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
