"""The two search stages of a run: their environments, the child evaluator, the stage trials,
and the children rebuilt from their records.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from torch import nn

from envs.checkpoint import load_network, save_checkpoint
from envs.evaluation import load_evaluator
from envs.spec import arch_hash
from envs.surgery import make_child
from pipeline.children.evaluator import KDEvaluator
from pipeline.config.schema import KD_EVALUATOR, RunConfig
from pipeline.data.teachers import Teacher
from pipeline.job.context import Job
from pipeline.search.records import ENV_CLASSES
from pipeline.search.trial import run_stage, stage_settings
from pipeline.tracking.progress import StageMonitor
from pipeline.tracking.rundir import RunDir, ok

logger = logging.getLogger(__name__)


def make_evaluator(
    cfg: RunConfig, teacher: Teacher, run_dir: RunDir
) -> tuple[tuple[str, dict[str, Any]], Any]:
    """The child evaluator as (import path, kwargs) for env_config, and the driver's instance.

    The KD evaluator (or a subclass of it) is prepared here, once: its data and teacher logits
    go to the object store and its reward cache persists in ``RUN_DIR/cache.sqlite``.
    """
    path = cfg.search.evaluator
    module, _, name = path.partition(":")
    cls = KDEvaluator if path == KD_EVALUATOR else getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, KDEvaluator)):
        instance = load_evaluator(path, dict(cfg.search.evaluator_kwargs))
        return (path, dict(cfg.search.evaluator_kwargs)), instance
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
    instance = cls(**kwargs).prepare()
    return (path, instance.config()), instance


def env_config(
    job: Job, stage: str, start: str | None, cfg: RunConfig | None = None
) -> dict[str, Any]:
    """The env_config of a stage's environments (for ``cfg``, default the job's config)."""
    cfg = cfg or job.cfg
    config: dict[str, Any] = {
        "teacher": str(job.parent.path),
        "evaluator": job.evaluator[0],
        "evaluator_config": job.evaluator[1],
        "reward": job.reward(cfg),
    }
    s = cfg.shrinkage
    cut = {"ratios": list(s.ratios), "min_channels": s.min_channels, "importance": s.importance}
    if stage == "shrinkage":
        config.update(cut, sequential=s.sequential, start=start)
        if s.fit_budget and job.limits:
            config["limits"] = dict(job.limits)
    elif cfg.removal.fit_budget and job.limits:
        config.update(cut, limits=dict(job.limits))
    return config


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
        cfg.rollout_timeout_s(stage), job.policies.get(stage),
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
    """The child of a record, rebuilt by surgery with the weights it was cut from (the
    teacher's, or stage 1's best child's for a stage 2 child)."""
    s = job.cfg.shrinkage
    if row["stage"] == "removal":  # shrunk uniformly to the budget when ``ratios`` say so
        model, spec = make_child(
            job.parent.model, job.parent.spec, remove=row.get("removed") or [],
            ratios=row.get("ratios") or None, min_channels=s.min_channels,
            importance=s.importance,
        )  # fmt: skip
    else:
        base_model, base_spec = parent or (job.parent.model, job.parent.spec)
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


def stage_start(
    job: Job, rows: list[dict[str, Any]]
) -> tuple[str | None, tuple[nn.Module, dict[str, Any]] | None]:
    """Where stage 2 starts: stage 1's best child (saved with the teacher's weights), or the
    teacher. A removal child shrunk to the budget (``removal.fit_budget``) passes on its
    removals only: stage 2 chooses the widths."""
    best = best_row(rows)
    if best is None or best["reward"] <= 0:
        return None, None
    folder = job.run_dir.file("removal_best")
    unshrunk = {**best, "ratios": None, "arch_hash": None} if best.get("ratios") else best
    model, spec = rebuild_child(job, unshrunk, None)
    save_checkpoint(
        folder,
        model,
        spec,
        {k: best[k] for k in ("arch_hash", "reward", "accuracy", "compression")},
    )
    return str(folder), load_network(str(folder), "start")
