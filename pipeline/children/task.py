"""The body of one child's Ray task: distil it from the payload's teacher logits and score it.

A task never raises for a bad child: errors come back as ``ChildResult.error =
"ErrorClass: message"`` (reward -1 in the env). Failures that depend on the machine's load
rather than on the child (timeouts, out of memory) are marked :data:`NOT_CACHEABLE`, so the
reward cache does not keep them. The payload (training and validation data and the teacher's
logits, see ``pipeline.children.payload``) reaches the task through Ray's object store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
import torch
from torch import nn

from envs.evaluation import ChildResult
from pipeline.children.distill import ChildTimeoutError, DistillResult, distill
from pipeline.children.early_stop import CheckpointRule, StopPlan
from pipeline.children.kd import KDSettings
from pipeline.children.payload import payload_tensors
from pipeline.torch_utils import measure_latency

logger = logging.getLogger(__name__)

NOT_CACHEABLE = "not_cacheable"
"""Key in ``ChildResult.extra`` marking failures that depend on load, not on the child."""


def train_child(
    payload: dict[str, Any],
    model: nn.Module,
    cfg: KDSettings,
    timeout_s: float | None,
    latency_batch: int | None,
    num_threads: int,
    plan: StopPlan | None = None,
) -> ChildResult:
    """Distils one child from the payload's teacher logits and scores it; never raises.

    This is the body of the Ray task (also called directly in local mode). Errors come back as
    ``ChildResult.error = "ErrorClass: message"``; those that depend on the machine's load
    rather than on the child (timeouts, out of memory) are marked not cacheable. With a
    ``plan`` the child may stop early (its accuracy then a lower bound); a child trained to
    its full budget enters its reward into the leaderboard.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    deadline = started + timeout_s if timeout_s is not None else None
    try:
        torch.set_num_threads(num_threads)
        rule = None
        if plan is not None:
            rule = CheckpointRule(plan, cfg.total_steps(len(payload["train_y"])))
        result = distill_payload(
            model,
            payload,
            cfg,
            deadline=deadline,
            checkpoints=rule.steps if rule else (),
            on_checkpoint=rule,
        )
        extra: dict[str, Any] = {
            "initial_accuracy": result.initial_accuracy,
            "train_time_s": result.train_time_s,
            "final_loss": result.final_loss,
            "epochs": result.epochs,
            "device": result.device,
            "cpu_time_s": time.process_time() - cpu_started,
        }
        latency = None
        if latency_batch is not None:
            timings = measure_latency(model, payload["input_shape"], (1, latency_batch))
            latency = timings[1]
            extra["latency_batch_s"] = timings[latency_batch]
            extra["latency_batch"] = latency_batch
        if rule is not None:
            extra.update(rule.record(result.stopped_early))
        scored = ChildResult(
            accuracy=result.accuracy,
            wall_time_s=time.perf_counter() - started,
            kd_steps=result.steps,
            latency_s=latency,
            extra=extra,
        )
        if plan is not None and not result.stopped_early:
            plan.offer_result(scored)
        return scored
    except ChildTimeoutError as err:
        return ChildResult(
            error=f"ChildTimeoutError: exceeded the per-child timeout of {timeout_s:g} s ({err})",
            wall_time_s=time.perf_counter() - started,
            extra={NOT_CACHEABLE: True},
        )
    except torch.cuda.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        result = error_result(err, started)
        result.extra[NOT_CACHEABLE] = True  # may fit when fewer children share the GPU
        return result
    except Exception as err:
        logger.debug("child failed", exc_info=True)
        return error_result(err, started)


@ray.remote
def child_task(payload: dict[str, Any], *args: Any) -> ChildResult:
    """The Ray task: Ray resolves ``payload`` from the object store (zero-copy for arrays)."""
    return train_child(payload, *args)


def error_result(err: BaseException, started: float) -> ChildResult:
    message = str(err).strip().splitlines()
    return ChildResult(
        error=f"{type(err).__name__}: {message[0] if message else 'no message'}",
        wall_time_s=time.perf_counter() - started,
    )


def distill_payload(
    student: nn.Module,
    payload: dict[str, Any],
    cfg: KDSettings,
    deadline: float | None = None,
    checkpoints: Sequence[int] = (),
    on_checkpoint: Callable[[int, float], bool] | None = None,
    teacher: nn.Module | None = None,
) -> DistillResult:
    """:func:`distill` on the training and validation data of an object-store payload (with
    ``teacher`` run on every batch when ``cfg`` augments the images)."""
    data = payload_tensors(payload)
    return distill(
        student,
        data["train_x"],
        data["train_y"],
        data["teacher_logits"],
        data["val_x"],
        data["val_y"],
        cfg,
        deadline=deadline,
        checkpoints=checkpoints,
        on_checkpoint=on_checkpoint,
        teacher=teacher,
    )
