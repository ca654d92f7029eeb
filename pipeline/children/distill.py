"""Knowledge-distillation training of one network: the loop, read as torchvision's
reference script reads (:func:`distill` drives :func:`train_one_epoch`, which runs
:func:`train_step`; accuracy is measured at checkpoints and at the end).

Every action of the search costs one call to :func:`distill`: the child starts from the
teacher's surviving weights and is trained briefly to match the teacher's logits, computed
once per run (``pipeline.children.kd.teacher_logits``); passing ``teacher=`` instead
recomputes them batch by batch (for augmented data, and to measure what the cache saves).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.children.kd import KDSettings, kd_loss, l2_loss, make_optimizer, make_scheduler
from pipeline.data.augment import augment
from pipeline.torch_utils import (
    channels_last_is_safe,
    evaluate_accuracy,
    resolve_device,
    seed_everything,
    sync,
)

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The distillation loss became NaN or infinite: the child diverged."""


class ChildTimeoutError(TimeoutError):
    """A child's training ran past its deadline."""


@dataclass
class DistillResult:
    """What one distillation run measured."""

    accuracy: float
    """Validation accuracy after training."""
    initial_accuracy: float | None
    """Validation accuracy of the child as built (before training), if measured."""
    steps: int
    epochs: float
    """Passes over the training subset that ``steps`` amounts to."""
    train_examples: int
    final_loss: float
    """Mean loss over the last (up to) 20 steps."""
    wall_time_s: float
    """Whole call: setup, both evaluations and training."""
    train_time_s: float
    """The optimisation loop, with its checkpoint measurements (if any)."""
    device: str
    curve: list[tuple[int, float]] = field(default_factory=list)
    """``(step, validation accuracy)`` at each checkpoint reached (see :func:`distill`)."""
    stopped_early: bool = False
    """Training stopped at a checkpoint: ``accuracy`` is the last measured one, a lower bound
    of the full budget's if accuracy does not fall with training."""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def distill(
    student: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    cfg: KDSettings | None = None,
    *,
    teacher: nn.Module | None = None,
    deadline: float | None = None,
    checkpoints: Sequence[int] = (),
    on_checkpoint: Callable[[int, float], bool] | None = None,
) -> DistillResult:
    """Trains ``student`` in place to match the teacher, then scores it on the validation data.

    At each of ``checkpoints`` the validation accuracy is measured too (in eval mode, without
    touching the training's random state, so training goes on exactly as it would without
    it) and added to the result's ``curve``; when ``on_checkpoint(step, accuracy)`` returns
    True, training stops there and that accuracy is the result's.

    Args:
        student: the child, already holding the teacher's surviving weights.
        train_x, train_y: training images and labels (CPU tensors).
        teacher_logits: the teacher's logits for ``train_x`` (see :func:`teacher_logits`), or
            None to run ``teacher`` on every batch instead.
        val_x, val_y: validation data the accuracy is measured on.
        cfg: budget, loss and optimiser; defaults to :class:`KDSettings`'s defaults.
        teacher: the teacher network, needed only when ``teacher_logits`` is None.
        deadline: a ``time.perf_counter()`` value; passing it raises :class:`ChildTimeoutError`.
        checkpoints: step numbers in ``[1, total steps)`` after which accuracy is measured.
        on_checkpoint: called with each checkpoint's step and accuracy; True stops training.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (the child diverged).
        ChildTimeoutError: the deadline passed.
        ValueError: inconsistent data, or student and teacher disagree on the number of outputs.
    """
    cfg = cfg or KDSettings()
    start = time.perf_counter()
    _check_data(train_x, train_y, teacher_logits, teacher)
    seed_everything(cfg.seed)
    run = _prepare(student, train_x, train_y, teacher_logits, teacher, cfg, checkpoints)
    val = _Validation(val_x, val_y, cfg.eval_batch_size)
    initial = val.accuracy(student) if cfg.measure_initial else None
    _check_deadline(deadline, 0)

    student.train()
    train_start = time.perf_counter()
    while run.step < run.total_steps and not run.stopped:
        train_one_epoch(run, val, deadline, on_checkpoint)
    sync(run.device)
    train_time = time.perf_counter() - train_start

    accuracy = run.curve[-1][1] if run.stopped else val.accuracy(student)
    return DistillResult(
        accuracy=accuracy,
        initial_accuracy=initial,
        steps=run.step,
        epochs=run.step / run.batches_per_epoch,
        train_examples=run.n_used,
        final_loss=float(torch.stack(run.recent).mean()),
        wall_time_s=time.perf_counter() - start,
        train_time_s=train_time,
        device=str(run.device),
        curve=run.curve,
        stopped_early=run.stopped,
    )


@dataclass
class _Validation:
    """The validation data a child is measured on, and how."""

    x: torch.Tensor
    y: torch.Tensor
    batch_size: int

    def accuracy(self, model: nn.Module) -> float:
        return evaluate_accuracy(model, self.x, self.y, self.batch_size)


@dataclass
class _Run:
    """One distillation in progress: the data on its device, the optimiser, the counters."""

    student: nn.Module
    cfg: KDSettings
    device: torch.device
    memory_format: torch.memory_format
    xs: torch.Tensor
    ys: torch.Tensor
    ts: torch.Tensor | None
    """The teacher's logits for ``xs``, or None to run ``teacher`` on every batch."""
    teacher: nn.Module | None
    generator: torch.Generator
    augment_generator: torch.Generator
    n_used: int
    batch: int
    batches_per_epoch: int
    total_steps: int
    checkpoint_steps: set[int]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    check_every: int
    """Steps between finiteness checks: each one syncs a GPU, so it is sparser there."""
    step: int = 0
    recent: list[torch.Tensor] = field(default_factory=list)
    """The last (up to) 20 losses, for ``DistillResult.final_loss``."""
    curve: list[tuple[int, float]] = field(default_factory=list)
    stopped: bool = False


def _check_data(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    teacher: nn.Module | None,
) -> None:
    n = len(train_y)
    if n == 0 or len(train_x) != n:
        raise ValueError(
            f"training data has {len(train_x)} images and {n} labels; both must match and be > 0"
        )
    if teacher_logits is None and teacher is None:
        raise ValueError("distill needs teacher_logits or a teacher to compute them from")
    if teacher_logits is not None and len(teacher_logits) != n:
        raise ValueError(
            f"{len(teacher_logits)} teacher logits for {n} training examples; recompute them"
        )


def _prepare(
    student: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    teacher: nn.Module | None,
    cfg: KDSettings,
    checkpoints: Sequence[int],
) -> _Run:
    """Places the student, teacher and data on the device and builds the optimiser."""
    device = resolve_device(cfg.device)
    memory_format = torch.preserve_format
    if train_x.dim() == 4 and not channels_last_is_safe(student, device):
        # NCHW explicitly, whatever cfg says: channels-last weights alone pull oneDNN to it.
        memory_format = torch.contiguous_format
    elif train_x.dim() == 4 and cfg.channels_last:
        memory_format = torch.channels_last
    if cfg.augment != "none" and teacher is None:
        raise ValueError(
            f"distill augment={cfg.augment!r} needs the teacher (teacher=...): its logits on "
            "augmented images cannot come from the cache"
        )
    student.to(device=device, memory_format=memory_format)
    if teacher is not None:
        teacher.eval().to(device=device, memory_format=memory_format)

    n = len(train_y)
    generator = torch.Generator().manual_seed(cfg.seed)
    n_used = max(1, round(n * cfg.data_fraction))
    subset = torch.randperm(n, generator=generator)[:n_used].sort().values
    total_steps = cfg.total_steps(n)
    checkpoint_steps = set(checkpoints)
    if any(not 1 <= s < total_steps for s in checkpoint_steps):
        raise ValueError(
            f"checkpoints {sorted(checkpoint_steps)} must be steps in [1, {total_steps}) "
            "(the final step is always measured)"
        )

    # Gather the child's subset once (no copy when it is everything); on CUDA it moves to the
    # device in one copy.
    def gather(t: torch.Tensor) -> torch.Tensor:
        return (t if n_used == n else t[subset]).to(device)

    optimizer = make_optimizer(student, cfg)
    cuda = device.type == "cuda"
    amp_dtype = _amp_dtype(device) if cfg.amp and cuda else None
    batch = min(cfg.batch_size, n_used)
    return _Run(
        student=student, cfg=cfg, device=device, memory_format=memory_format,
        xs=gather(train_x), ys=gather(train_y),
        ts=gather(teacher_logits) if teacher_logits is not None and cfg.augment == "none" else None,
        teacher=teacher, augment_generator=torch.Generator().manual_seed(cfg.seed + 1),
        generator=generator, n_used=n_used, batch=batch, batches_per_epoch=n_used // batch,
        total_steps=total_steps, checkpoint_steps=checkpoint_steps, optimizer=optimizer,
        scheduler=make_scheduler(optimizer, cfg, total_steps),
        amp_dtype=amp_dtype,
        scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None,
        check_every=1 if not cuda else 25,
    )  # fmt: skip


def train_one_epoch(
    run: _Run,
    val: _Validation,
    deadline: float | None,
    on_checkpoint: Callable[[int, float], bool] | None,
) -> None:
    """One pass over the child's training subset in a fresh random order (or until the
    budget is spent, or a checkpoint stops the child)."""
    order = torch.randperm(run.n_used, generator=run.generator).to(run.device)
    for b in range(run.batches_per_epoch):
        loss = train_step(run, order[b * run.batch : (b + 1) * run.batch])
        _after_step(run, loss, val, deadline, on_checkpoint)
        if run.step >= run.total_steps or run.stopped:
            return


def train_step(run: _Run, idx: torch.Tensor) -> torch.Tensor:
    """One optimiser step on the examples ``idx``; returns the (detached) loss."""
    cfg, device, autocast = run.cfg, run.device, run.amp_dtype is not None
    xb, yb = run.xs[idx], run.ys[idx]
    if cfg.augment != "none":
        xb = augment(xb, cfg.augment, run.augment_generator)
    if run.memory_format is torch.channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    if run.ts is not None:
        tb = run.ts[idx]
    else:
        with torch.no_grad(), torch.autocast(device.type, run.amp_dtype, enabled=autocast):
            tb = run.teacher(xb).float()
    with torch.autocast(device.type, run.amp_dtype, enabled=autocast):
        out = run.student(xb)
    if run.step == 0 and out.shape != tb.shape:
        raise ValueError(
            f"student outputs shape {tuple(out.shape)} but the teacher's logits have "
            f"{tuple(tb.shape)}; the child must keep the teacher's classifier outputs"
        )
    out = out.float()
    if cfg.loss == "l2":
        loss = l2_loss(out, tb)
    else:
        loss = kd_loss(out, tb, yb, cfg.temperature, cfg.alpha, cfg.label_smoothing)

    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        loss.backward()
        run.optimizer.step()
    if run.scheduler is not None:
        run.scheduler.step()
    run.step += 1
    return loss.detach()


def _after_step(
    run: _Run,
    loss: torch.Tensor,
    val: _Validation,
    deadline: float | None,
    on_checkpoint: Callable[[int, float], bool] | None,
) -> None:
    """Checks the loss and the deadline, and measures the child at its checkpoints."""
    run.recent.append(loss)
    if len(run.recent) > 20:
        run.recent.pop(0)
    checkpoint = run.step in run.checkpoint_steps
    if run.step % run.check_every == 0 or run.step == run.total_steps or checkpoint:
        if not torch.isfinite(loss).item():
            cfg = run.cfg
            raise NonFiniteLossError(
                f"distillation loss became {loss.item()} at step {run.step} of "
                f"{run.total_steps} (lr {cfg.lr}, optimizer {cfg.optimizer}); lower the "
                "learning rate"
            )
        _check_deadline(deadline, run.step)
    if checkpoint:
        run.curve.append((run.step, val.accuracy(run.student)))
        run.stopped = on_checkpoint is not None and bool(on_checkpoint(*run.curve[-1]))


def _amp_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the GPU supports it (no loss scaling needed), else float16."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _check_deadline(deadline: float | None, step: int) -> None:
    if deadline is not None and time.perf_counter() > deadline:
        raise ChildTimeoutError(
            f"training passed its deadline after {step} steps; raise the per-child timeout"
        )
