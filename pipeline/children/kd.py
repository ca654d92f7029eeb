"""The knowledge-distillation objective: how one child is distilled, its losses, the teacher's logits.

:class:`KDSettings` says how one network is distilled (loss, budget, optimiser, schedule); the
search's children, the fine-tuned students and the classic methods' students all train with
it (``pipeline.children.distill``). Two losses, chosen by :attr:`KDSettings.loss`:

- ``"l2"``: N2N's mean squared error between student and teacher logits;
- ``"kd"``: Hinton's KL divergence between temperature-softened distributions (times T^2),
  weighted ``alpha`` against cross-entropy on the labels.

The teacher's logits on the (un-augmented) training data never change, so they are computed
once per run with :func:`teacher_logits` and shared by every child.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.augment import AUGMENTATIONS
from pipeline.torch_utils import model_device, resolve_device

LOSSES = ("kd", "l2")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine")


NEUTRAL = {"warmup": 0.0, "augment": "none", "label_smoothing": 0.0}
"""Settings whose default changes nothing, left out of :meth:`KDSettings.fingerprint` then,
so that a reward cache written before they existed still answers."""


@dataclass(frozen=True)
class KDSettings:
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
    warmup: float = 0.0
    """Share of the steps over which the learning rate rises linearly from zero first."""
    augment: str = "none"
    """Per-image augmentation of each batch (``pipeline.data.augment``): ``"none"``,
    ``"shift"``, ``"flip"`` or ``"shift+flip"``. Augmented images need the teacher's logits on
    them, so the teacher runs on every batch (``teacher=`` in ``distill``)."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy term of the ``"kd"`` loss."""
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
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"distill augment {self.augment!r} is not one of {AUGMENTATIONS}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(
                f"distill warmup {self.warmup!r} must be a share of the steps in [0, 1)"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"distill label_smoothing {self.label_smoothing!r} must lie in [0, 1)")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distill alpha {self.alpha!r} must lie in [0, 1]")
        for name in ("temperature", "lr", "batch_size", "eval_batch_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"distill {name} {getattr(self, name)!r} must be > 0")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | KDSettings | None) -> KDSettings:
        """Builds a config from keyword values, naming any unknown key."""
        if isinstance(values, KDSettings):
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
        for key, default in NEUTRAL.items():  # added later: their defaults keep old hashes
            if values[key] == default:
                values.pop(key)
        text = json.dumps(values, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Hinton et al.'s distillation loss: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``."""
    soft = F.kl_div(
        F.log_softmax(student / temperature, dim=1),
        F.log_softmax(teacher / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    hard = (
        F.cross_entropy(student, labels, label_smoothing=label_smoothing)
        if alpha < 1.0
        else student.new_zeros(())
    )
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
    was_training, home = teacher.training, model_device(teacher)
    teacher.eval().to(device)
    try:
        outs = [teacher(chunk.to(device)).float().cpu() for chunk in x.split(batch_size)]
    finally:  # the caller's teacher stays where it was: surgery on it traces on the CPU
        teacher.train(was_training).to(home)
    return torch.cat(outs) if outs else torch.empty(0)


def make_optimizer(model: nn.Module, cfg: KDSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: KDSettings, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The learning rate over the steps: a linear warm-up over ``cfg.warmup`` of them, then
    constant or a cosine decay to zero (``cfg.schedule``)."""
    warm = int(round(cfg.warmup * total_steps))
    if warm == 0:
        if cfg.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
        return None

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
