"""The classic compressors users already know, as methods of the tool: ``n2n baseline METHOD``.

Each method starts from the same teacher, ends with the same KD fine-tuning budget as the
students of ``n2n run`` (``finetune.steps`` at ``finetune.lr``, ``distill``'s loss; see
``pipeline.children.students.finetune_settings``) and leaves the same records, so a comparison is at
equal cost:

- ``l1-unstructured``: L1 magnitude pruning of conv/linear weights (``torch.nn.utils.prune``,
  one global threshold or per layer) over ``baseline.amounts``; masks stay on during KD
  fine-tuning and are made permanent before saving. Sparsity alone makes the dense model
  neither smaller nor faster, and its records say so.
- ``slimming``: Network Slimming (Liu et al., 2017): a short KD training with an L1 penalty on
  BatchNorm gammas, then rounds of global channel pruning by gamma, each keeping
  ``baseline.round_factor`` of the parameters until the budget, with KD between rounds. The
  channel coupling is the shrinkage stage's (``envs.surgery``).
- ``structured-l1``: Torch-Pruning's group L1 channel pruning to each parameter budget,
  uniform or global, then KD.
- ``kd-student``: a zoo network (``baseline.student_arch``) at the width that fits each budget,
  trained from scratch with the same KD loss.
- ``random``: the random search of ``n2n run --algo random`` (same child budget as the RL
  search, same fine-tuning).

Budgets come from ``baseline.compression`` (teacher params / factor) and ``baseline.params``.
A method's run directory holds ``config.yaml``, ``students.csv`` (one record per budget or
amount), ``students/<i>/`` (``spec.json`` + ``weights.pt`` + ``metrics.json``) and
``summary.json``. A student whose pruning or training fails keeps a record with its error and
reward -1.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from rich.console import Console

from envs.checkpoint import load_checkpoint, save_checkpoint
from pipeline.baselines.methods import (
    Context,
    StudentJob,
    failed_record,
    kd_student_jobs,
    l1_unstructured_jobs,
    slimming_jobs,
    structured_l1_jobs,
)
from pipeline.children.payload import make_payload
from pipeline.cluster.runtime import init_ray
from pipeline.config.presets import validate_config
from pipeline.config.schema import RunConfig
from pipeline.data.datasets import load_splits
from pipeline.data.teachers import prepare_teacher
from pipeline.job import run as search_run
from pipeline.tracking.rundir import RunDir

logger = logging.getLogger(__name__)

METHODS = ("l1-unstructured", "slimming", "structured-l1", "kd-student", "random")


def run_baseline(
    cfg: RunConfig,
    method: str,
    console: Console | None = None,
    tracker: Any = None,
    splits: Any = None,
    targets: list[int] | None = None,
) -> dict[str, Any]:
    """Runs one classic method in ``cfg.output.run_dir``; returns its summary.

    Args:
        cfg: the run config with resolved paths (the teacher, data, budgets and fine-tuning).
        method: one of :data:`METHODS`.
        console: progress lines go here; None logs them.
        tracker: a started-able ``pipeline.tracking.tracker.Tracker``, or None for no MLflow.
        splits: the loaded dataset, if the caller has it.
        targets: parameter budgets; default ``cfg.baseline.targets(teacher params)``.

    Returns:
        ``{"method", "teacher", "records": [record, ...], "student": best record (by reward
        on validation accuracy), "child_evaluations", "wall_time_s"}``; ``random`` returns
        ``n2n run``'s summary with the same keys added (see :func:`with_records`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown baseline method {method!r}: use one of {list(METHODS)}")
    if method == "random":
        return _random(cfg, console, tracker, splits)
    started = time.monotonic()
    run_dir = RunDir(cfg.output.run_dir)
    run_dir.write_config(cfg.to_yaml())
    owns_ray = init_ray(cfg)
    try:
        splits = splits if splits is not None else load_splits(cfg)
        teacher = prepare_teacher(
            cfg, splits, run_dir.file("teacher"), progress=console is not None
        )
        ctx = Context(
            cfg, run_dir, splits, teacher, ray.put(make_payload(splits, teacher.model)),
            ray.put((splits.test[0].numpy(), splits.test[1].numpy())), console,
            ray.put(teacher.model),
        )  # fmt: skip
        targets = targets or cfg.baseline.targets(teacher.facts["params"])
        if tracker is not None:
            tracker.start(
                cfg.model_dump(mode="json"), teacher.facts, dataset=cfg.data.name,
                tags={"method": method}, run_name=f"{cfg.name}-{method}",
            )  # fmt: skip
        jobs = {
            "l1-unstructured": lambda: l1_unstructured_jobs(ctx),
            "structured-l1": lambda: structured_l1_jobs(ctx, targets),
            "slimming": lambda: slimming_jobs(ctx, targets),
            "kd-student": lambda: kd_student_jobs(ctx, targets),
        }[method]()
        ctx.say(
            f"[bold]{method}[/]: {len(jobs)} students from {teacher.facts['arch']} "
            f"({teacher.facts['params']:,} params), {cfg.finetune.steps} KD steps each"
        )
        records = _run_jobs(ctx, method, jobs)
        summary = _summary(ctx, method, records, time.monotonic() - started)
        run_dir.write_table("students.csv", records)
        run_dir.write_summary(summary)
        if tracker is not None:
            tracker.log_baseline(run_dir.path, summary)
            if cfg.baseline.register_best and summary["student"]:
                ckpt = load_checkpoint(run_dir.file(f"students/{summary['student']['index']}"))
                tracker.finish(
                    run_dir.path, ckpt.model, ckpt.spec, summary, example_inputs=splits.test[0][:8]
                )
        return summary
    finally:
        if owns_ray:
            ray.shutdown()


def _run_jobs(ctx: Context, method: str, jobs: list[StudentJob]) -> list[dict[str, Any]]:
    """Runs a method's students concurrently (Ray queues the trainings); saves each one."""

    def run(index: int, job: StudentJob) -> dict[str, Any]:
        try:
            record, model, spec = job()
        except Exception as err:
            logger.debug("%s student %d failed", method, index, exc_info=True)
            record, model, spec = failed_record(method, f"#{index}", err), None, None
        record["index"] = index
        if model is not None and spec is not None:
            save_checkpoint(ctx.run_dir.file(f"students/{index}"), model, spec, record)
        _say_record(ctx, record)
        return record

    with ThreadPoolExecutor(max(1, len(jobs))) as pool:
        return list(pool.map(run, range(1, len(jobs) + 1), jobs))


def _say_record(ctx: Context, r: dict[str, Any]) -> None:
    if r.get("error"):
        ctx.say(f"{r['method']} {r['label']}: [red]failed[/]: {r['error']}")
        return
    ctx.say(
        f"{r['method']} {r['label']}: {r['params']:,} params ({r['nonzero_params']:,} non-zero), "
        f"{r['compression']:.1f}x, val {r['val_accuracy']:.4f}, test {r['test_accuracy']:.4f} "
        f"({r['delta'] * 100:+.2f} pts), {r['wall_time_s']:.0f} s"
    )


def _summary(
    ctx: Context, method: str, records: list[dict[str, Any]], wall: float
) -> dict[str, Any]:
    keys = ("params", "flops", "size_bytes", "val_accuracy", "test_accuracy", "arch")
    good = [r for r in records if not r.get("error")]
    return {
        "name": ctx.cfg.name,
        "method": method,
        "dataset": ctx.cfg.data.name,
        "teacher": {k: ctx.teacher.facts[k] for k in keys},
        "records": records,
        "student": max(good, key=lambda r: r["reward"]) if good else None,
        "child_evaluations": ctx.evaluations,
        "cost": {
            "kd_steps": ctx.kd_steps,
            "teacher_forwards": len(ctx.splits.train[1]) + ctx.teacher_forwards,
        },
        "failed": len(records) - len(good),
        "wall_time_s": round(wall, 1),
    }


def _random(cfg: RunConfig, console: Console | None, tracker: Any, splits: Any) -> dict[str, Any]:
    """Random search: ``n2n run --algo random``, summarised like the other methods."""
    raw = cfg.model_dump()
    raw["search"]["algo"] = "random"
    summary = search_run.run(validate_config(raw), console=console, tracker=tracker, splits=splits)
    return with_records(summary, "random")


def with_records(summary: dict[str, Any], method: str) -> dict[str, Any]:
    """Adds the baseline record keys to an ``n2n run`` summary (its fine-tuned students)."""
    teacher = summary["teacher"]
    records = []
    for s in summary["students"]:
        records.append({
            "method": method, "label": f"rank {s['rank']}" + (" best" if s.get("best") else ""),
            "params": s["params"], "nonzero_params": s["params"], "flops": s["flops"],
            "size_bytes": s["size_bytes"], "compression": teacher["params"] / max(s["params"], 1),
            "sparse_compression": teacher["params"] / max(s["params"], 1),
            "val_accuracy": s["val_accuracy"], "test_accuracy": s["test_accuracy"],
            "delta": s["test_accuracy"] - teacher["test_accuracy"], "reward": s["reward"],
            "kd_steps": s["kd_steps"], "child_evaluations": summary["children"]["evaluated"],
            "wall_time_s": summary["wall_time_s"], "error": None, "best": bool(s.get("best")),
        })  # fmt: skip
    return {
        **summary,
        "method": method,
        "records": records,
        "child_evaluations": summary["children"]["evaluated"],
    }
