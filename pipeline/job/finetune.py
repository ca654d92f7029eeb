"""Fine-tuning the best students: a longer KD budget, then the test split, once.

The top-k distinct children of the search (by reward) are rebuilt by surgery from the
teacher (or from stage 1's best child, for stage 2 children), trained as parallel Ray tasks
with ``finetune.steps`` KD steps and measured on the test split. The final student is chosen
by the reward recomputed with its fine-tuned *validation* accuracy, never by test accuracy.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import ray
from torch import nn

from envs.checkpoint import save_checkpoint
from envs.costs import model_costs
from envs.rewards import ChildScore, make_reward
from pipeline.children.payload import make_payload
from pipeline.children.students import finetune_settings, train_student_task
from pipeline.config.errors import NoFeasibleStudent
from pipeline.job.context import Job
from pipeline.tracking.rundir import ok

logger = logging.getLogger(__name__)


def _payload(job: Job) -> ray.ObjectRef:
    """Training data and teacher logits in the object store (the evaluator's, when it has them)."""
    existing = getattr(job.evaluator_instance, "payload", None)
    if not isinstance(existing, ray.ObjectRef):
        return ray.put(make_payload(job.splits, job.teacher.model))
    if getattr(job.evaluator_instance, "val_subset", None) is None:
        return existing
    # The search scored children on a validation subset; students are scored on all of it.
    data = ray.get(existing)
    val_x, val_y = job.splits.val
    return ray.put({**data, "val_x": val_x.numpy(), "val_y": val_y.numpy()})


def within(row: dict[str, Any], limits: dict[str, int]) -> bool:
    """Whether a child (or student) record is within the budget ``limits`` (counts)."""
    return all(row.get(key) is not None and row[key] <= n for key, n in limits.items())


def top_candidates(
    rows: list[dict[str, Any]], k: int, limits: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """The ``k`` best successful children by search reward, one per architecture, within the
    budget ``limits`` when there is one.

    Raises:
        NoFeasibleStudent: children were evaluated but none is within the budget.
    """
    distinct: dict[str, dict[str, Any]] = {}
    for row in sorted((r for r in rows if ok(r)), key=lambda r: -r["reward"]):
        distinct.setdefault(row["arch_hash"], row)
    if not distinct:
        raise RuntimeError(
            "no child was evaluated successfully, so there is no student to fine-tune"
        )
    candidates = [r for r in distinct.values() if within(r, limits or {})][:k]
    if not candidates:
        smallest = min(distinct.values(), key=lambda r: r["params"])
        asked = ", ".join(f"{key} <= {n:,}" for key, n in (limits or {}).items())
        raise NoFeasibleStudent(
            f"no student within the budget ({asked}): the smallest of {len(distinct)} "
            f"architectures evaluated has {smallest['params']:,} params and "
            f"{smallest['flops']:,} FLOPs; raise the budget, or let the search shrink further "
            "(smaller shrinkage.ratios, lower shrinkage.min_channels, more iterations)"
        )
    return candidates


def choose_best(students: list[dict[str, Any]]) -> dict[str, Any]:
    """The final student: the highest reward recomputed with its fine-tuned *validation*
    accuracy (within a budget that is the most accurate student), never by test accuracy.
    Marks it ``best``."""
    best = max(students, key=lambda s: s["reward"])
    best["best"] = True
    return best


def finetune(
    job: Job, candidates: list[dict[str, Any]], built: list[tuple[nn.Module, dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Fine-tunes students, saves them to ``students/<rank>/`` and the final one to ``best/``.

    Args:
        job: the run: config, data, teacher, evaluator, run directory.
        candidates: child records in rank order (see :func:`top_candidates`).
        built: each candidate's network (teacher weights, by surgery) and student spec.

    Returns:
        One metrics dict per fine-tuned student; the final one has ``best: True``.
    """
    cfg = job.cfg
    settings = finetune_settings(cfg)
    payload = _payload(job)
    test = ray.put((job.splits.test[0].numpy(), job.splits.test[1].numpy()))
    # Augmented batches need the teacher's logits on them: it travels once, as a reference.
    teacher = ray.put(job.teacher.model) if settings.augment != "none" else None
    job.say(
        f"[bold]fine-tuning[/] {len(candidates)} students for {cfg.finetune.steps} KD steps each"
    )
    refs = [
        train_student_task.options(
            num_cpus=cfg.ray.cpus_per_child,
            num_gpus=cfg.ray.gpus_per_child,
            scheduling_strategy="DEFAULT",
        ).remote(payload, model, settings, test, max(1, int(cfg.ray.cpus_per_child)), 0.0, teacher)
        for model, _ in built
    ]
    reward_fn = make_reward(job.reward())
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
            "search_accuracy": row["accuracy"], "kd_steps": out["kd_steps"],
            "teacher_forwards": out.get("teacher_forwards", 0), "wall_time_s": out["wall_time_s"],
        }  # fmt: skip
        save_checkpoint(job.run_dir.file(f"students/{rank}"), model, spec, metrics)
        students.append(metrics)
    if not students:
        raise RuntimeError(f"fine-tuning failed for every student: {job.warnings[-1]}")
    best = choose_best(students)
    best_dir = job.run_dir.file("best")
    shutil.rmtree(best_dir, ignore_errors=True)
    model, spec = built[best["rank"] - 1]  # ranks follow candidates, failed ones included
    save_checkpoint(best_dir, model, spec, best)
    return students
