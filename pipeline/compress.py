"""The whole ``n2n run`` job: teacher -> removal search -> shrinkage search -> fine-tuning.

Reads top to bottom like the job itself:

1. :func:`init_ray` joins a cluster (``ray.address``) or starts a local one sized to the
   machine; :func:`load_splits` and :func:`prepare_teacher` load the data and the teacher
   (training one on the fly into ``RUN_DIR/teacher`` when no checkpoint is given);
2. :func:`make_evaluator` prepares the knowledge-distillation evaluator once (data and
   teacher logits in the object store, the reward cache in ``RUN_DIR/cache.sqlite``);
3. :func:`search_stage` runs stage 1 (removal) and stage 2 (shrinkage, starting from stage
   1's best child) as Tune trials (``pipeline.search``), either stage skippable;
4. :func:`finetune` trains the top-k distinct students longer, as parallel Ray tasks, and
   measures them once on the test split; the best by validation reward becomes ``best/``;
5. ``summary.json``: teacher vs student params, FLOPs, size, test accuracy, compression.

``resume=True`` continues a run directory: finished steps are skipped (``state.json``),
an interrupted stage continues from its Tune checkpoints, and the reward cache answers for
every child already trained, so none is trained twice.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import yaml
from rich.console import Console
from rich.table import Table
from torch import nn

from envs.costs import model_costs
from envs.env import load_network
from envs.evaluation import load_evaluator
from envs.rewards import ChildScore, make_reward
from envs.spec import arch_hash, load_checkpoint, save_checkpoint
from envs.surgery import make_child
from pipeline.config import ConfigError, RunConfig, validate_config
from pipeline.outputs import RunDir, ok
from pipeline.progress import Clock, StageMonitor
from pipeline.search import ENV_CLASSES, RUNNER_CPUS, STAGES, child_log, run_stage, stage_settings

logger = logging.getLogger(__name__)

KD_EVALUATOR = "pipeline.evaluator:KDEvaluator"


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
    """Joins ``ray.address`` or starts a local cluster; returns whether it started Ray."""
    if ray.is_initialized():
        return False
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=False)
    else:
        ray.init(
            num_cpus=cfg.ray.num_cpus,
            num_gpus=cfg.ray.num_gpus,
            object_store_memory=cfg.ray.object_store_mb * 1024**2,
            include_dashboard=False,
            log_to_driver=False,
        )
    return True


def check_resources(cfg: RunConfig) -> None:
    """Fails when the cluster cannot hold one stage trial plus one child task at once."""
    have = ray.cluster_resources()
    need_cpu = RUNNER_CPUS * (1 + cfg.search.env_runners) + cfg.ray.cpus_per_child
    if have.get("CPU", 0) + 1e-9 < need_cpu:
        raise ValueError(
            f"the Ray cluster has {have.get('CPU', 0):g} CPUs but a search with "
            f"{cfg.search.env_runners} env runners and ray.cpus_per_child={cfg.ray.cpus_per_child:g} "
            f"needs {need_cpu:g}; lower ray.cpus_per_child or search.env_runners"
        )
    if cfg.ray.gpus_per_child > have.get("GPU", 0):
        raise ValueError(
            f"ray.gpus_per_child={cfg.ray.gpus_per_child:g} but the cluster has "
            f"{have.get('GPU', 0):g} GPUs; set ray.gpus_per_child=0 to train children on CPUs"
        )


def load_splits(cfg: RunConfig) -> Any:
    """The dataset, split into train / val (rewards) / test (final report only)."""
    from pipeline.data import load_dataset

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
    from pipeline.distill import evaluate_accuracy
    from pipeline.teachers import TeacherConfig, load_teacher, train_teacher

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
    from pipeline.evaluator import KDEvaluator

    kwargs = {
        "teacher": str(teacher.path),
        "dataset": cfg.data.as_kwargs(cfg.seed),
        "distill": cfg.distill.as_kwargs(cfg.seed),
        "num_cpus": cfg.ray.cpus_per_child,
        "num_gpus": cfg.ray.gpus_per_child,
        "timeout_s": cfg.distill.timeout_s,
        "cache_path": str(run_dir.file("cache.sqlite")),
        **cfg.search.evaluator_kwargs,
    }
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
        stage, cfg.search, cfg.stage(stage), config, units, choices, cfg.seed, job.log_name
    )
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


# --------------------------------------------------------------------------- fine-tuning


@ray.remote
def _finetune_task(
    payload: dict[str, Any],
    model: nn.Module,
    cfg: Any,
    test: tuple[np.ndarray, np.ndarray],
    threads: int,
) -> dict[str, Any]:
    """Distils one student with the fine-tuning budget; returns its weights and accuracies."""
    from pipeline.distill import distill, evaluate_accuracy

    torch.set_num_threads(threads)
    data = {
        k: torch.as_tensor(np.array(v)) for k, v in payload.items() if isinstance(v, np.ndarray)
    }
    result = distill(
        model,
        data["train_x"],
        data["train_y"],
        data["teacher_logits"],
        data["val_x"],
        data["val_y"],
        cfg,
    )
    test_acc = evaluate_accuracy(model.cpu(), torch.as_tensor(test[0]), torch.as_tensor(test[1]))
    return {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "val_accuracy": result.accuracy,
        "test_accuracy": test_acc,
        "kd_steps": result.steps,
        "wall_time_s": result.wall_time_s,
    }


def _payload(job: Job) -> Any:
    """Training data and teacher logits in the object store (the evaluator's, when it has them)."""
    existing = getattr(job.evaluator_instance, "payload", None)
    if isinstance(existing, ray.ObjectRef):
        return existing
    from pipeline.distill import teacher_logits

    x, y = job.splits.train
    return ray.put({
        "train_x": x.numpy(), "train_y": y.numpy(),
        "val_x": job.splits.val[0].numpy(), "val_y": job.splits.val[1].numpy(),
        "teacher_logits": teacher_logits(job.teacher.model, x).numpy(),
    })  # fmt: skip


def finetune(
    job: Job, rows: list[dict[str, Any]], parent: tuple[nn.Module, dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """Fine-tunes the top-k distinct students, saves them to ``students/<rank>/`` and ``best/``.

    Students are ranked by search reward; the final one is chosen by the reward recomputed
    with its fine-tuned *validation* accuracy. The test split is measured, never selected on.
    """
    from pipeline.distill import DistillConfig

    cfg = job.cfg
    distinct: dict[str, dict[str, Any]] = {}
    for row in sorted((r for r in rows if ok(r)), key=lambda r: -r["reward"]):
        distinct.setdefault(row["arch_hash"], row)
    candidates = list(distinct.values())[: cfg.finetune.top_k]
    if not candidates:
        raise RuntimeError(
            "no child was evaluated successfully, so there is no student to fine-tune"
        )
    settings = DistillConfig.from_dict(
        cfg.distill.as_kwargs(
            cfg.seed, steps=cfg.finetune.steps, lr=cfg.finetune.lr, measure_initial=False
        )
    )
    payload = _payload(job)
    test = ray.put((job.splits.test[0].numpy(), job.splits.test[1].numpy()))
    built = [rebuild_child(job, row, parent) for row in candidates]
    job.say(
        f"[bold]fine-tuning[/] {len(candidates)} students for {cfg.finetune.steps} KD steps each"
    )
    refs = [
        _finetune_task.options(
            num_cpus=cfg.ray.cpus_per_child,
            num_gpus=cfg.ray.gpus_per_child,
            scheduling_strategy="DEFAULT",
        ).remote(payload, model, settings, test, max(1, int(cfg.ray.cpus_per_child)))
        for model, _ in built
    ]
    reward_fn = make_reward(cfg.reward.as_env_config())
    teacher = job.teacher.facts
    students = []
    for rank, (row, (model, spec), ref) in enumerate(
        zip(candidates, built, refs, strict=True), start=1
    ):
        try:
            out = ray.get(ref)
        except Exception as err:  # e.g. the loss diverged with the longer budget
            cause = getattr(err, "cause", None) or err
            message = (
                f"fine-tuning student {row['arch_hash']} failed: {type(cause).__name__}: {cause}"
            )
            job.warnings.append(message)
            logger.warning(message)
            continue
        model.load_state_dict(out["state_dict"])
        costs = model_costs(model, job.splits.input_shape).as_dict()
        score = ChildScore(
            accuracy=out["val_accuracy"], teacher_accuracy=teacher["val_accuracy"], params=costs["params"],
            teacher_params=teacher["params"], flops=costs["flops"], teacher_flops=teacher["flops"],
        )  # fmt: skip
        metrics = {
            "rank": rank, "stage": row["stage"], "arch_hash": row["arch_hash"], **costs,
            "compression": 1.0 - costs["params"] / teacher["params"],
            "val_accuracy": out["val_accuracy"], "test_accuracy": out["test_accuracy"],
            "reward": float(reward_fn(score)), "search_reward": row["reward"],
            "search_accuracy": row["accuracy"], "kd_steps": out["kd_steps"], "wall_time_s": out["wall_time_s"],
        }  # fmt: skip
        save_checkpoint(job.run_dir.file(f"students/{rank}"), model, spec, metrics)
        students.append(metrics)
    if not students:
        raise RuntimeError(f"fine-tuning failed for every student: {job.warnings[-1]}")
    best = max(students, key=lambda s: s["reward"])
    best["best"] = True
    best_dir = job.run_dir.file("best")
    shutil.rmtree(best_dir, ignore_errors=True)
    model, spec = built[best["rank"] - 1]  # ranks follow candidates, failed ones included
    save_checkpoint(best_dir, model, spec, best)
    return students


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
    check_resources(cfg)
    splits = splits if splits is not None else load_splits(cfg)
    teacher = prepare_teacher(cfg, run_dir, splits, console)
    if tracker is not None:
        stages = [s for s in STAGES if cfg.stage(s).enabled]
        tracker.start(
            cfg.model_dump(mode="json"), teacher.facts, dataset=cfg.data.name,
            tags={"algo": cfg.search.algo, "policy": cfg.search.policy, "stages": ",".join(stages)},
        )  # fmt: skip
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
    if not resume:
        run_dir.write_config(cfg.to_yaml())
    owns_ray = init_ray(cfg)
    job: Job | None = None
    try:
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
        students = finetune(job, all_rows, parent)
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
    instance = job.evaluator_instance
    cache = instance.cache_stats() if hasattr(instance, "cache_stats") else {}
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
        },
        "cache": {k: v for k, v in cache.items() if k != "path"},
        "warnings": job.warnings,
        "wall_time_s": round(wall, 1),
    }


# --------------------------------------------------------------------------- sweeps

SWEEPABLE = ("seed", "search.", "removal.", "shrinkage.", "reward.")
"""Config keys a sweep may vary: the search, not the data, teacher or child budget."""


def sweep_variants(cfg: RunConfig) -> list[tuple[str, RunConfig]]:
    """Every grid combination (times ``sweep.num_samples`` seeds) as a validated config.

    Raises:
        ConfigError: an empty sweep, a key a sweep may not vary, or a value the key rejects.
    """
    grid, repeats = cfg.sweep.grid, cfg.sweep.num_samples
    if not grid and repeats == 1:
        raise ConfigError("a sweep needs sweep.grid (or --grid key=v1,v2) or sweep.num_samples > 1")
    for key in grid:
        if not (key == "seed" or key.startswith(SWEEPABLE[1:])):
            raise ConfigError(
                f"sweep.grid key {key!r} cannot vary in a sweep (it changes the data, teacher or "
                f"child budget); sweep keys under {', '.join(SWEEPABLE)}"
            )
    base = cfg.model_dump(mode="json")
    variants = []
    for combo in itertools.product(*grid.values()):
        for repeat in range(repeats):
            raw = copy.deepcopy(base)
            parts = []
            for key, value in zip(grid, combo, strict=True):
                value = yaml.safe_load(value) if isinstance(value, str) else value
                node = raw
                *path, last = key.split(".")
                for part in path:
                    node = node.setdefault(part, {})
                node[last] = value
                parts.append(f"{key}={value}")
            if repeats > 1 and "seed" not in grid:
                raw["seed"] = cfg.seed + repeat
                parts.append(f"seed={raw['seed']}")
            variants.append((" ".join(parts), validate_config(raw)))
    return variants


def sweep(
    cfg: RunConfig,
    variants: list[tuple[str, RunConfig]],
    console: Console | None = None,
    tracker: Any = None,
    splits: Any = None,
) -> list[dict[str, Any]]:
    """Runs the first enabled stage once per variant as parallel Tune trials (ASHA optional).

    Returns one row per trial (label, episodes, mean and best reward, best compression and
    accuracy), also written to ``RUN_DIR/sweep.csv``; every child is in ``children.csv``.
    """
    run_dir = RunDir(cfg.output.run_dir)
    run_dir.write_config(cfg.to_yaml())
    stage = next(s for s in STAGES if cfg.stage(s).enabled)
    owns_ray = init_ray(cfg)
    job: Job | None = None
    try:
        planned = sum(v.stage(stage).iterations for _, v in variants)
        job = _open_job(cfg, run_dir, console, tracker, splits, planned)
        probe = ENV_CLASSES[stage](env_config(job, stage, None))
        units = len(probe.units)
        variant_settings = []
        for label, variant in variants:
            config = env_config(job, stage, None, variant)
            choices = 2 if stage == "removal" else len(variant.shrinkage.ratios)
            settings = stage_settings(
                stage,
                variant.search,
                variant.stage(stage),
                config,
                units,
                choices,
                variant.seed,
                job.log_name,
            )
            variant_settings.append({**settings, "label": label})
        scheduler = None
        if cfg.sweep.scheduler == "asha" and len(variants) > 1:
            from ray.tune.schedulers import ASHAScheduler

            max_t = max(v.stage(stage).iterations for _, v in variants)
            scheduler = ASHAScheduler(
                time_attr="iteration", max_t=max_t, grace_period=min(cfg.sweep.grace_period, max_t)
            )
        monitor = StageMonitor(
            stage, job.log, run_dir, job.clock, console, tracker, per_trial_names=True
        )
        callbacks = [monitor.callback()]
        job.say(
            f"[bold]sweep[/] of {stage}: {len(variants)} trials, {cfg.sweep.max_concurrent} at once"
        )
        results = run_stage(
            f"sweep-{stage}", variant_settings, cfg.output.storage_path, callbacks,
            scheduler=scheduler, max_concurrent=cfg.sweep.max_concurrent,
        )  # fmt: skip
        table = []
        for result in results:
            trial_id = result.metrics["trial_id"]
            rows = monitor.rows.get(trial_id, [])
            rewards = [r["reward"] for r in rows]
            best = best_row(rows)
            table.append({
                "trial": trial_id,
                "label": result.config["settings"]["label"],
                "iterations": result.metrics.get("iteration"),
                "episodes": len(rows),
                "reward_mean": sum(rewards) / len(rewards) if rewards else float("nan"),
                "best_reward": best["reward"] if best else float("nan"),
                "best_compression": best["compression"] if best else float("nan"),
                "best_accuracy": best["accuracy"] if best else float("nan"),
            })  # fmt: skip
        run_dir.write_table("sweep.csv", table)
        return table
    finally:
        _release(job)
        if owns_ray:
            ray.shutdown()


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
