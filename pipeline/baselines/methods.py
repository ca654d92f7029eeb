"""The classic methods as jobs: each method is a list of :data:`StudentJob`, one per budget
(or amount), which prunes or builds a student from the teacher and trains it with the shared
fine-tuning (``pipeline.children.students``); every job returns the same :func:`student_record`.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from rich.console import Console
from torch import nn

from envs.costs import count_params, model_costs
from envs.rewards import FAILED_REWARD, ChildScore, make_reward
from pipeline.baselines.slimming import slim
from pipeline.baselines.structured import structured_l1
from pipeline.baselines.unstructured import make_permanent, prune_unstructured, sparsity
from pipeline.baselines.zoo_student import budget_student
from pipeline.children.students import finetune_settings, train_student_task
from pipeline.config.schema import RunConfig
from pipeline.torch_utils import evaluate_accuracy
from pipeline.tracking.rundir import RunDir

logger = logging.getLogger(__name__)

SPARSITY_NOTE = (
    "unstructured sparsity: the dense model keeps every parameter and runs no faster; only "
    "sparse storage or sparse kernels would gain from the zeros"
)


@dataclass
class Context:
    """What every method of one ``n2n baseline`` run shares."""

    cfg: RunConfig
    run_dir: RunDir
    splits: Any
    teacher: Any
    """``pipeline.data.teachers.Teacher``."""
    payload: Any
    """Object-store reference to the training data and teacher logits."""
    test: Any
    """Object-store reference to the test images and labels."""
    console: Console | None
    teacher_ref: Any = None
    """Object-store reference to the teacher, run on augmented batches (``finetune.augment``)."""
    evaluations: int = 0
    """KD trainings run so far (the methods' "child evaluations")."""
    kd_steps: int = 0
    """KD steps of every training so far (sparsity phase, rounds, fine-tuning)."""
    teacher_forwards: int = 0
    """Teacher forward passes on augmented batches (its cached logits are counted apart)."""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _surgery_lock: threading.Lock = field(default_factory=threading.Lock)

    def surgery(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Runs a model transformation alone: ``torch.fx`` tracing patches ``nn.Module``
        globally, so two traces in two threads corrupt each other."""
        with self._surgery_lock:
            return fn(*args, **kwargs)

    def say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False)
        else:
            logger.info(text)

    def train(
        self, model: nn.Module, steps: int | None = None, bn_l1: float = 0.0, test: bool = True
    ) -> dict[str, Any]:
        """KD-trains ``model`` in place as one Ray task; returns accuracies and timings."""
        cfg = self.cfg
        ref = train_student_task.options(
            num_cpus=cfg.ray.cpus_per_child,
            num_gpus=cfg.ray.gpus_per_child,
            scheduling_strategy="DEFAULT",
        ).remote(
            self.payload,
            model,
            finetune_settings(cfg, steps),
            self.test if test else None,
            max(1, int(cfg.ray.cpus_per_child)),
            bn_l1,
            self.teacher_ref if cfg.finetune.augment != "none" else None,
        )
        out = ray.get(ref)
        model.load_state_dict(out.pop("state_dict"))
        with self._lock:
            self.evaluations += 1
            self.kd_steps += int(out["kd_steps"])
            self.teacher_forwards += int(out.get("teacher_forwards") or 0)
        return out


def student_record(
    ctx: Context,
    method: str,
    label: str,
    model: nn.Module,
    trained: dict[str, Any],
    seconds: float,
    evaluations: int,
    **extra: Any,
) -> dict[str, Any]:
    """The record every method (and ``n2n run``) reports for one student."""
    teacher = ctx.teacher.facts
    costs = ctx.surgery(model_costs, model, ctx.splits.input_shape).as_dict()
    counts = sparsity(model)
    score = ChildScore(
        accuracy=trained["val_accuracy"], teacher_accuracy=teacher["val_accuracy"],
        params=counts["nonzero_params"], teacher_params=teacher["params"],
        flops=costs["flops"], teacher_flops=teacher["flops"],
    )  # fmt: skip
    return {
        "method": method,
        "label": label,
        **costs,
        "nonzero_params": counts["nonzero_params"],
        "compression": teacher["params"] / max(costs["params"], 1),
        "sparse_compression": teacher["params"] / max(counts["nonzero_params"], 1),
        "val_accuracy": trained["val_accuracy"],
        "test_accuracy": trained["test_accuracy"],
        "delta": trained["test_accuracy"] - teacher["test_accuracy"],
        "reward": float(make_reward(ctx.cfg.reward.as_env_config({}, teacher))(score)),
        "kd_steps": trained.get("kd_steps"),
        "child_evaluations": evaluations,
        "wall_time_s": round(seconds, 1),
        "error": None,
        **extra,
    }


def failed_record(method: str, label: str, err: BaseException, **extra: Any) -> dict[str, Any]:
    cause = getattr(err, "cause", None) or err
    message = str(cause).strip().splitlines()
    return {
        "method": method,
        "label": label,
        "reward": FAILED_REWARD,
        "error": f"{type(cause).__name__}: {message[0] if message else 'no message'}",
        **extra,
    }


StudentJob = Callable[[], tuple[dict[str, Any], nn.Module | None, dict[str, Any] | None]]
"""One student of a method: returns (record, model, spec); the model is saved when given."""


def l1_unstructured_jobs(ctx: Context) -> list[StudentJob]:
    b = ctx.cfg.baseline

    def job(amount: float) -> StudentJob:
        def run() -> tuple[dict[str, Any], nn.Module, dict[str, Any]]:
            started = time.perf_counter()
            model = ctx.surgery(prune_unstructured, ctx.teacher.model, amount, b.scope)
            trained = ctx.train(model) if b.finetune else _score_as_is(ctx, model)
            make_permanent(model)
            record = student_record(
                ctx, "l1-unstructured", f"{b.scope} {amount:.0%}", model, trained,
                time.perf_counter() - started, int(b.finetune), amount=amount, note=SPARSITY_NOTE,
            )  # fmt: skip
            return record, model, ctx.teacher.spec

        return run

    return [job(a) for a in b.amounts]


def structured_l1_jobs(ctx: Context, targets: list[int]) -> list[StudentJob]:
    b = ctx.cfg.baseline

    def job(target: int) -> StudentJob:
        def run() -> tuple[dict[str, Any], nn.Module, dict[str, Any]]:
            started = time.perf_counter()
            model, spec = ctx.surgery(
                structured_l1,
                ctx.teacher.model, ctx.teacher.spec, target, mode=b.mode,
                min_channels=ctx.cfg.shrinkage.min_channels,
            )  # fmt: skip
            trained = ctx.train(model)
            record = student_record(
                ctx, "structured-l1", f"{b.mode} <= {target:,}", model, trained,
                time.perf_counter() - started, 1, target_params=target,
            )  # fmt: skip
            return record, model, spec

        return run

    return [job(t) for t in targets]


def slimming_jobs(ctx: Context, targets: list[int]) -> list[StudentJob]:
    b, cfg = ctx.cfg.baseline, ctx.cfg
    sparse: dict[str, Any] = {}
    sparse_lock = threading.Lock()

    def sparse_teacher() -> tuple[nn.Module, float, int]:
        """The teacher after sparsity training (trained once, shared by every budget)."""
        with sparse_lock:
            if not sparse:
                started = time.perf_counter()
                model = copy.deepcopy(ctx.teacher.model)
                if b.sparsity_steps > 0 and b.sparsity_l1 > 0:
                    ctx.say(
                        f"slimming: {b.sparsity_steps} KD steps with L1 {b.sparsity_l1:g} on "
                        "BatchNorm gammas"
                    )
                    ctx.train(model, b.sparsity_steps, bn_l1=b.sparsity_l1, test=False)
                    sparse["evaluations"] = 1
                sparse.update(model=model, seconds=time.perf_counter() - started)
            return sparse["model"], sparse["seconds"], sparse.get("evaluations", 0)

    def job(target: int) -> StudentJob:
        def run() -> tuple[dict[str, Any], nn.Module, dict[str, Any]]:
            model, seconds, evaluations = sparse_teacher()
            started = time.perf_counter()
            spec = ctx.teacher.spec
            rounds = 0
            while True:
                params = count_params(model)
                if params <= target:
                    break
                step_target = max(target, int(params * b.round_factor))
                model, spec = ctx.surgery(
                    slim, model, spec, step_target, cfg.shrinkage.min_channels
                )
                rounds += 1
                left = count_params(model)
                if left >= params:  # every group is at min_channels: the budget is out of reach
                    raise ValueError(
                        f"slimming cannot go below {left:,} params (budget {target:,}); lower "
                        "shrinkage.min_channels or raise the budget"
                    )
                if left <= target:
                    break
                ctx.train(model, b.round_steps or cfg.distill.steps, test=False)
                evaluations += 1
                ctx.say(f"slimming <= {target:,}: round {rounds} left {left:,} params")
            trained = ctx.train(model)
            record = student_record(
                ctx, "slimming", f"<= {target:,}", model, trained,
                seconds + time.perf_counter() - started, evaluations + 1,
                target_params=target, rounds=rounds,
            )  # fmt: skip
            return record, model, spec

        return run

    return [job(t) for t in targets]


def kd_student_jobs(ctx: Context, targets: list[int]) -> list[StudentJob]:
    b, splits = ctx.cfg.baseline, ctx.splits

    def job(target: int) -> StudentJob:
        def run() -> tuple[dict[str, Any], nn.Module, dict[str, Any]]:
            started = time.perf_counter()
            torch.manual_seed(ctx.cfg.seed)
            model, spec = ctx.surgery(
                budget_student,
                b.student_arch,
                target,
                list(splits.input_shape),
                splits.num_classes,
            )
            trained = ctx.train(model)
            record = student_record(
                ctx, "kd-student", f"{b.student_arch} <= {target:,}", model, trained,
                time.perf_counter() - started, 1, target_params=target,
                width=spec["base"]["kwargs"].get("width"),
            )  # fmt: skip
            return record, model, spec

        return run

    return [job(t) for t in targets]


def _score_as_is(ctx: Context, model: nn.Module) -> dict[str, Any]:
    return {
        "val_accuracy": evaluate_accuracy(model, *ctx.splits.val),
        "test_accuracy": evaluate_accuracy(model, *ctx.splits.test),
        "kd_steps": 0,
    }
