"""Knowledge-distillation training of one child network, and how to measure it.

Every action of the search costs one call to :func:`distill`: the child starts from the
teacher's surviving weights and is trained briefly to match the teacher. The teacher's logits
on the (un-augmented) training data never change, so they are computed once per run with
:func:`teacher_logits` and shared by every child; passing ``teacher=`` instead recomputes them
batch by batch (for augmented data, and to measure what the cache saves).

Two losses, chosen by :attr:`DistillConfig.loss`:

- ``"l2"``: N2N's mean squared error between student and teacher logits;
- ``"kd"``: Hinton's KL divergence between temperature-softened distributions (times T^2),
  weighted ``alpha`` against cross-entropy on the labels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

LOSSES = ("kd", "l2")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine")


class NonFiniteLossError(RuntimeError):
    """The distillation loss became NaN or infinite: the child diverged."""


class ChildTimeoutError(TimeoutError):
    """A child's training ran past its deadline."""


@dataclass(frozen=True)
class DistillConfig:
    """How one child is distilled. Fields that change the result enter :meth:`fingerprint`."""

    loss: str = "kd"
    """``"kd"`` (Hinton KD + cross-entropy) or ``"l2"`` (N2N's L2 on logits)."""
    temperature: float = 4.0
    """Softmax temperature of the ``"kd"`` loss."""
    alpha: float = 0.9
    """Weight of the KD term against cross-entropy in the ``"kd"`` loss."""
    steps: int | None = 100
    """Optimizer steps per child; when None, ``epochs`` sets the budget."""
    epochs: float = 1.0
    """Passes over the (fraction of the) training data, used only when ``steps`` is None."""
    data_fraction: float = 1.0
    """Share of the training split a child draws its batches from (a seeded subset)."""
    optimizer: str = "sgd"
    """``"sgd"`` (with momentum) or ``"adam"``."""
    lr: float = 0.01
    momentum: float = 0.9
    """SGD momentum (ignored by Adam)."""
    weight_decay: float = 0.0
    schedule: str = "constant"
    """Learning rate over the steps: ``"constant"``, or ``"cosine"`` decay to zero (for the
    longer fine-tuning, where it is worth about a point of accuracy at equal steps)."""
    batch_size: int = 128
    seed: int = 0
    """Seeds the batch order and any random initialisation: equal seeds give equal children."""
    device: str = "auto"
    """``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:N]"``."""
    amp: bool = True
    """Mixed precision (bfloat16, or float16 with loss scaling) when on CUDA; ignored on CPU."""
    channels_last: bool = True
    """Channels-last memory format for image batches (4-D inputs), on CUDA and on CPU alike:
    a CPU training step (1 thread, batch 128) measured 1.3-1.6x faster than NCHW across the
    zoo (``benchmarks/step_time.py``). On the CPU a child that :func:`channels_last_is_safe`
    refuses trains in NCHW whatever this says."""
    measure_initial: bool = False
    """Also score the child before training (recorded as ``initial_accuracy``): a diagnostic
    that costs one more pass over the validation data, so off by default."""
    eval_batch_size: int = 1024

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"distill loss {self.loss!r} is not one of {LOSSES}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"distill schedule {self.schedule!r} is not one of {SCHEDULES}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"distill optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"distill steps {self.steps!r} must be >= 1 (or None to use epochs)")
        if self.steps is None and not self.epochs > 0:
            raise ValueError(f"distill epochs {self.epochs!r} must be > 0 when steps is None")
        if not 0.0 < self.data_fraction <= 1.0:
            raise ValueError(f"distill data_fraction {self.data_fraction!r} must lie in (0, 1]")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distill alpha {self.alpha!r} must lie in [0, 1]")
        for name in ("temperature", "lr", "batch_size", "eval_batch_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"distill {name} {getattr(self, name)!r} must be > 0")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | DistillConfig | None) -> DistillConfig:
        """Builds a config from keyword values, naming any unknown key."""
        if isinstance(values, DistillConfig):
            return values
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown distill settings {unknown}; known ones are {sorted(known)}")
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def total_steps(self, train_examples: int) -> int:
        """The optimizer steps one child takes on a training split of ``train_examples``."""
        n_used = max(1, round(train_examples * self.data_fraction))
        if self.steps is not None:
            return self.steps
        batches_per_epoch = n_used // min(self.batch_size, n_used)
        return max(1, math.ceil(self.epochs * batches_per_epoch))

    def fingerprint(self) -> str:
        """A short hash of every field that can change a child's accuracy."""
        values = self.as_dict()
        values.pop("eval_batch_size")
        values.pop("measure_initial")
        text = json.dumps(values, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


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


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and PyTorch (all devices) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` becomes CUDA when available, else CPU; a missing CUDA is a clear error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} was asked for but CUDA is not available; use 'auto' or 'cpu'"
        )
    return device


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Hinton et al.'s distillation loss: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``."""
    soft = F.kl_div(
        F.log_softmax(student / temperature, dim=1),
        F.log_softmax(teacher / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student, labels) if alpha < 1.0 else student.new_zeros(())
    return alpha * temperature**2 * soft + (1.0 - alpha) * hard


def l2_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """N2N's loss: mean squared error between student and teacher logits."""
    return F.mse_loss(student, teacher)


@torch.no_grad()
def teacher_logits(
    teacher: nn.Module, x: torch.Tensor, batch_size: int = 1024, device: str | torch.device = "auto"
) -> torch.Tensor:
    """The teacher's logits (float32, on the CPU) for every example of ``x``, in eval mode.

    Computed once per run and reused by every child: the teacher dominates the cost of a KD
    step whenever the student is much smaller than it.
    """
    device = resolve_device(device)
    was_training, home = teacher.training, _model_device(teacher)
    teacher.eval().to(device)
    try:
        outs = [teacher(chunk.to(device)).float().cpu() for chunk in x.split(batch_size)]
    finally:  # the caller's teacher stays where it was: surgery on it traces on the CPU
        teacher.train(was_training).to(home)
    return torch.cat(outs) if outs else torch.empty(0)


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``x``, on the device the model lives on."""
    if len(y) == 0:
        raise ValueError("cannot measure accuracy on an empty set; check the dataset's split sizes")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
            out = model(xb.to(device, non_blocking=True))
            correct += int((out.argmax(dim=1).cpu() == yb).sum())
    finally:
        model.train(was_training)
    return correct / len(y)


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 64),
    device: str | torch.device | None = None,
    warmup: int = 3,
    repeats: int = 10,
) -> dict[int, float]:
    """Median seconds of one forward pass (eval mode) for each batch size, on ``device``.

    ``device`` defaults to the device the model already lives on.
    """
    device = _model_device(model) if device is None else resolve_device(device)
    model = model.to(device)
    was_training = model.training
    model.eval()
    timings: dict[int, float] = {}
    try:
        for batch in batch_sizes:
            x = torch.randn(int(batch), *input_shape, device=device)
            for _ in range(warmup):
                model(x)
            samples = []
            for _ in range(repeats):
                _sync(device)
                start = time.perf_counter()
                model(x)
                _sync(device)
                samples.append(time.perf_counter() - start)
            timings[int(batch)] = float(np.median(samples))
    finally:
        model.train(was_training)
    return timings


def distill(
    student: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    cfg: DistillConfig | None = None,
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
        cfg: budget, loss and optimiser; defaults to :class:`DistillConfig`'s defaults.
        teacher: the teacher network, needed only when ``teacher_logits`` is None.
        deadline: a ``time.perf_counter()`` value; passing it raises :class:`ChildTimeoutError`.
        checkpoints: step numbers in ``[1, total steps)`` after which accuracy is measured.
        on_checkpoint: called with each checkpoint's step and accuracy; True stops training.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (the child diverged).
        ChildTimeoutError: the deadline passed.
        ValueError: inconsistent data, or student and teacher disagree on the number of outputs.
    """
    cfg = cfg or DistillConfig()
    start = time.perf_counter()
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

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    images = train_x.dim() == 4
    memory_format = torch.preserve_format
    if images and not channels_last_is_safe(student, device):
        # NCHW explicitly, whatever cfg says: channels-last weights alone pull oneDNN to it.
        memory_format = torch.contiguous_format
    elif images and cfg.channels_last:
        memory_format = torch.channels_last
    student.to(device=device, memory_format=memory_format)
    if teacher is not None:
        teacher.eval().to(device=device, memory_format=memory_format)

    generator = torch.Generator().manual_seed(cfg.seed)
    n_used = max(1, round(n * cfg.data_fraction))
    subset = torch.randperm(n, generator=generator)[:n_used].sort().values
    batch = min(cfg.batch_size, n_used)
    batches_per_epoch = n_used // batch
    total_steps = cfg.total_steps(n)
    checkpoint_steps = set(checkpoints)
    if any(not 1 <= s < total_steps for s in checkpoint_steps):
        raise ValueError(
            f"checkpoints {sorted(checkpoint_steps)} must be steps in [1, {total_steps}) "
            "(the final step is always measured)"
        )
    curve: list[tuple[int, float]] = []
    stopped = False

    # Gather the child's subset once (no copy when it is everything); on CUDA it moves to the
    # device in one copy.
    def gather(t: torch.Tensor) -> torch.Tensor:
        return (t if n_used == n else t[subset]).to(device)

    xs, ys = gather(train_x), gather(train_y)
    ts = gather(teacher_logits) if teacher_logits is not None else None

    initial = (
        evaluate_accuracy(student, val_x, val_y, cfg.eval_batch_size)
        if cfg.measure_initial
        else None
    )
    _check_deadline(deadline, 0)

    optimizer = _make_optimizer(student, cfg)
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
        if cfg.schedule == "cosine"
        else None
    )
    amp_dtype = _amp_dtype(device) if cfg.amp and cuda else None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    check_every = 1 if not cuda else 25  # a finiteness check syncs the GPU: do it sparingly there
    recent: list[torch.Tensor] = []

    student.train()
    train_start = time.perf_counter()
    step = 0
    while step < total_steps:
        order = torch.randperm(n_used, generator=generator).to(device)
        for b in range(batches_per_epoch):
            idx = order[b * batch : (b + 1) * batch]
            xb, yb = xs[idx], ys[idx]
            if memory_format is torch.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            if ts is not None:
                tb = ts[idx]
            else:
                with (
                    torch.no_grad(),
                    torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None),
                ):
                    tb = teacher(xb).float()
            with torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None):
                out = student(xb)
            if step == 0 and out.shape != tb.shape:
                raise ValueError(
                    f"student outputs shape {tuple(out.shape)} but the teacher's logits have "
                    f"{tuple(tb.shape)}; the child must keep the teacher's classifier outputs"
                )
            out = out.float()
            if cfg.loss == "l2":
                loss = l2_loss(out, tb)
            else:
                loss = kd_loss(out, tb, yb, cfg.temperature, cfg.alpha)

            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step += 1

            recent.append(loss.detach())
            if len(recent) > 20:
                recent.pop(0)
            checkpoint = step in checkpoint_steps
            if step % check_every == 0 or step == total_steps or checkpoint:
                if not torch.isfinite(loss).item():
                    raise NonFiniteLossError(
                        f"distillation loss became {loss.item()} at step {step} of {total_steps} "
                        f"(lr {cfg.lr}, optimizer {cfg.optimizer}); lower the learning rate"
                    )
                _check_deadline(deadline, step)
            if checkpoint:
                curve.append((step, evaluate_accuracy(student, val_x, val_y, cfg.eval_batch_size)))
                stopped = on_checkpoint is not None and bool(on_checkpoint(*curve[-1]))
            if step >= total_steps or stopped:
                break
        if stopped:
            break
    _sync(device)
    train_time = time.perf_counter() - train_start

    if stopped:
        accuracy = curve[-1][1]
    else:
        accuracy = evaluate_accuracy(student, val_x, val_y, cfg.eval_batch_size)
    return DistillResult(
        accuracy=accuracy,
        initial_accuracy=initial,
        steps=step,
        epochs=step / batches_per_epoch,
        train_examples=n_used,
        final_loss=float(torch.stack(recent).mean()),
        wall_time_s=time.perf_counter() - start,
        train_time_s=train_time,
        device=str(device),
        curve=curve,
        stopped_early=stopped,
    )


def channels_last_is_safe(model: nn.Module, device: torch.device) -> bool:
    """Whether ``model`` may train in channels-last on ``device``.

    On x86 CPUs, oneDNN's 1x1 convolution weight gradient with a stride above 1 and fewer input
    channels (per group) than its channel block (8 with AVX2, 16 with AVX-512) writes past its
    workspace when the source is channels-last (uxlfoundation/oneDNN#6035; reproduced with the
    oneDNN of torch 2.14.1): the worker dies of heap corruption, or the gradients are wrong.
    Shrunk children meet that case (a ResNet downsample narrowed to a few channels), so such a
    model trains in NCHW on the CPU, where oneDNN uses its blocked layout and is correct.
    """
    if device.type != "cpu":
        return True
    for module in model.modules():
        if (
            isinstance(module, nn.Conv2d)
            and all(k == 1 for k in module.kernel_size)
            and any(s > 1 for s in module.stride)
            and module.in_channels // module.groups < 16
        ):
            return False
    return True


def _make_optimizer(model: nn.Module, cfg: DistillConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _amp_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the GPU supports it (no loss scaling needed), else float16."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _check_deadline(deadline: float | None, step: int) -> None:
    if deadline is not None and time.perf_counter() > deadline:
        raise ChildTimeoutError(
            f"training passed its deadline after {step} steps; raise the per-child timeout"
        )


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def payload_tensors(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a training payload fetched from Ray's object store, without copies.

    Object-store arrays are read-only; training only reads them, so PyTorch's warning about
    non-writable arrays is silenced rather than paid for with a copy.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return {k: torch.from_numpy(v) for k, v in payload.items() if isinstance(v, np.ndarray)}


def distill_payload(
    student: nn.Module,
    payload: dict[str, Any],
    cfg: DistillConfig,
    deadline: float | None = None,
    checkpoints: Sequence[int] = (),
    on_checkpoint: Callable[[int, float], bool] | None = None,
) -> DistillResult:
    """:func:`distill` on the training and validation data of an object-store payload."""
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
    )
