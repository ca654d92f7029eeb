"""Training and loading the teacher, the network the search compresses.

A teacher is saved like every other model here: ``spec.json`` + ``weights.pt`` (+
``metrics.json`` with validation/test accuracy, parameters and FLOPs), through
``envs.checkpoint.save_checkpoint``, so it can be rebuilt from its spec alone. ``n2n teacher``
calls :func:`train_teacher`; the search calls :func:`load_teacher`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from envs.builders import build_model, fit_arch
from envs.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from envs.costs import model_costs
from envs.spec import teacher_spec
from pipeline.config.schema import RunConfig
from pipeline.data.augment import AUGMENTATIONS, augment
from pipeline.data.datasets import Splits
from pipeline.torch_utils import (
    channels_last_is_safe,
    evaluate_accuracy,
    model_device,
    resolve_device,
    seed_everything,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherTraining:
    """How a teacher is trained (plain cross-entropy, one-cycle learning-rate schedule)."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    """``"sgd"`` (Nesterov momentum) or ``"adam"``."""
    lr: float = 0.05
    """Peak learning rate of the one-cycle schedule."""
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    augment: str = "none"
    """Per-image ``"shift"`` (random translations up to 1/8 of the image), ``"flip"``,
    ``"shift+flip"`` or ``"none"`` (``pipeline.data.augment``); flips suit natural images
    and clothing, not digits."""
    max_steps: int | None = None
    """Stop after this many steps (for tests); None trains all ``epochs``."""
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"teacher optimizer {self.optimizer!r} is not 'sgd' or 'adam'")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"teacher augment {self.augment!r} is not one of {AUGMENTATIONS}")
        for name in ("epochs", "batch_size", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"teacher {name} {getattr(self, name)!r} must be > 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"teacher max_steps {self.max_steps!r} must be >= 1 or None")


def teacher_base_spec(arch_spec: str | dict[str, Any], splits: Splits) -> dict[str, Any]:
    """Completes an architecture spec for a dataset: classes, input channels and input shape.

    ``arch_spec`` is a zoo name or import path (``"resnet18"``,
    ``"torchvision.models:mobilenet_v2"``) or ``{"arch": ..., "kwargs": {...}, "width": w}``.
    ``kwargs`` are passed to the builder as given; ``width`` (``teacher.width``) is passed only
    to builders that take it. The dataset's classes and channels are passed where the builder
    accepts them, else the network's input layer or classifier is adapted (see
    ``envs.builders.fit_arch``); an explicit value that contradicts the dataset is an error.
    """
    base = (
        {"arch": arch_spec, "kwargs": {}}
        if isinstance(arch_spec, str)
        else copy.deepcopy(arch_spec)
    )
    if not isinstance(base, dict) or "arch" not in base:
        raise ValueError(f"architecture spec {arch_spec!r} needs an 'arch' key")
    kwargs = dict(base.get("kwargs") or {})
    channels = splits.input_shape[0]
    for key, value in (("num_classes", splits.num_classes), ("in_channels", channels)):
        if key in kwargs and int(kwargs[key]) != value:
            raise ValueError(
                f"architecture {base['arch']!r} sets {key}={kwargs[key]} but dataset "
                f"{splits.name!r} has {value}; drop the setting or use another dataset"
            )
    shape = list(splits.input_shape)
    if base.get("input_shape") not in (None, shape):
        raise ValueError(
            f"architecture spec input_shape {base['input_shape']} differs from dataset "
            f"{splits.name!r} images {shape}"
        )
    width = base.get("width")
    optional = {} if width is None or "width" in kwargs else {"width": width}
    fitted = fit_arch(base["arch"], kwargs, shape, splits.num_classes, optional)
    if optional and optional["width"] != 1.0 and "width" not in fitted["kwargs"]:
        raise ValueError(
            f"teacher.width={optional['width']} has no effect: architecture {base['arch']!r} "
            "takes no 'width' argument; set teacher.width=1.0 and give the builder's own width "
            "argument in teacher.kwargs (e.g. {width_mult: 0.5} for torchvision's MobileNets)"
        )
    return fitted


def train_teacher(
    arch_spec: str | dict[str, Any],
    splits: Splits,
    cfg: TeacherTraining | None = None,
    out_dir: str | Path | None = None,
    progress: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Trains a zoo (or user) network on ``splits`` and measures it.

    Args:
        arch_spec: zoo name or architecture spec (see :func:`teacher_base_spec`).
        splits: the dataset; the teacher is selected on nothing, so ``val`` stays unbiased.
        cfg: training settings.
        out_dir: if given, the checkpoint (spec, weights, metrics) is written there.
        progress: show a progress bar (for the command line).

    Returns:
        The trained model (eval mode, on the CPU) and its metrics: ``val_accuracy``,
        ``test_accuracy``, ``params``, ``flops``, ``size_bytes``, ``steps``, ``wall_time_s``,
        ``dataset`` and ``config``.
    """
    cfg = cfg or TeacherTraining()
    base = teacher_base_spec(arch_spec, splits)
    seed_everything(cfg.seed)
    model = build_model(base)
    device = resolve_device(cfg.device)
    model.to(device)
    # Channels-last trains CNNs 1.3-1.6x faster on the CPU (benchmarks/step_time.py), except
    # where oneDNN's kernel is broken (see channels_last_is_safe).
    channels_last = splits.train[0].dim() == 4 and channels_last_is_safe(model, device)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    x, y = splits.train
    batch = min(cfg.batch_size, len(y))
    per_epoch = len(y) // batch
    total = (
        per_epoch * cfg.epochs
        if cfg.max_steps is None
        else min(cfg.max_steps, per_epoch * cfg.epochs)
    )
    optimizer = (
        torch.optim.SGD(
            model.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=True,
            weight_decay=cfg.weight_decay,
        )
        if cfg.optimizer == "sgd"
        else torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    generator = torch.Generator().manual_seed(cfg.seed)

    start = time.perf_counter()
    epochs = math.ceil(total / per_epoch)
    step = 0
    with Progress(progress, total, f"teacher {base['arch']} on {splits.name}") as shown:
        for epoch in range(1, epochs + 1):
            steps = min(per_epoch, total - step)
            loss = train_one_epoch(
                model, x, y, optimizer, schedule, cfg, generator, steps, shown, channels_last
            )
            step += steps
            shown.epoch(epoch, epochs, loss, time.perf_counter() - start)
    wall = time.perf_counter() - start

    model.eval()
    costs = model_costs(model, splits.input_shape)
    metrics = {
        "val_accuracy": evaluate_accuracy(model, *splits.val),
        "test_accuracy": evaluate_accuracy(model, *splits.test),
        **costs.as_dict(),
        "steps": step,
        "wall_time_s": wall,
        "dataset": splits.describe(),
        "config": dataclasses.asdict(cfg),
    }
    model.cpu()
    logger.info(
        "teacher %s: val %.4f test %.4f",
        base["arch"],
        metrics["val_accuracy"],
        metrics["test_accuracy"],
    )
    if out_dir is not None:
        save_checkpoint(out_dir, model, teacher_spec(base), metrics)
    return model, metrics


def train_one_epoch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    cfg: TeacherTraining,
    generator: torch.Generator,
    steps: int,
    progress: Progress,
    channels_last: bool = False,
) -> float:
    """``steps`` optimiser steps over a fresh random order of the training data; returns the
    mean loss of the epoch."""
    device = model_device(model)
    model.train()
    batch = min(cfg.batch_size, len(y))
    order = torch.randperm(len(y), generator=generator)
    total = 0.0
    for b in range(steps):
        idx = order[b * batch : (b + 1) * batch]
        xb = augment(x[idx], cfg.augment, generator).to(device)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(xb), y[idx].to(device), label_smoothing=cfg.label_smoothing)
        if not math.isfinite(loss.item()):
            raise ValueError(
                f"teacher loss became {loss.item()} at step {b + 1} of an epoch; lower the "
                f"learning rate (lr={cfg.lr})"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total += loss.item()
        progress.step()
    return total / max(steps, 1)


def load_teacher(path: str | Path, splits: Splits) -> Checkpoint:
    """Loads a teacher checkpoint and checks it fits the dataset.

    Raises:
        ValueError: a missing, truncated or mismatching checkpoint, or one made for another
            number of classes or image shape.
    """
    checkpoint = load_checkpoint(path, num_classes=splits.num_classes)
    shape = list(checkpoint.spec["base"]["input_shape"])
    if shape != list(splits.input_shape):
        raise ValueError(
            f"teacher {path} expects images of shape {shape} but dataset {splits.name!r} has "
            f"{list(splits.input_shape)}; train a teacher for this dataset (n2n teacher)"
        )
    return checkpoint


class Progress:
    """How teacher training shows its progress.

    On a terminal a rich progress bar; anywhere else (a file, a ``ray job`` or pod log, where
    a bar draws nothing until it ends) one plain line per epoch on stdout. Disabled, it only
    logs each epoch.
    """

    def __init__(self, enabled: bool, total: int, description: str, stream: Any = None) -> None:
        self.enabled, self.total, self.description = enabled, total, description
        self.stream = stream if stream is not None else sys.stdout
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if self.enabled and getattr(self.stream, "isatty", lambda: False)():
            from rich.progress import Progress as Bar

            self._bar = Bar(transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        return self

    def step(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def epoch(self, epoch: int, epochs: int, loss: float, elapsed: float) -> None:
        line = f"{self.description}: epoch {epoch}/{epochs}, loss {loss:.4f}, {elapsed:.0f} s"
        logger.info(line)
        if self.enabled and self._bar is None:
            print(line, file=self.stream, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


@dataclass
class Teacher:
    """The network being compressed and what it costs."""

    path: Path
    model: nn.Module
    spec: dict[str, Any]
    facts: dict[str, Any]
    """``params``, ``flops``, ``size_bytes``, ``val_accuracy``, ``test_accuracy``, ``arch``."""


def prepare_teacher(
    cfg: RunConfig, splits: Splits, folder: Path, progress: bool = False
) -> Teacher:
    """Loads ``teacher.checkpoint``, or the teacher already in ``folder``, or trains one there.

    ``folder`` is where a teacher trained here is saved: ``RUN_DIR/teacher`` in a run, or
    ``n2n teacher --out``. ``progress`` shows a progress bar while it trains.
    """
    path = Path(cfg.teacher.checkpoint) if cfg.teacher.checkpoint else folder
    if cfg.teacher.checkpoint is None and not (path / "weights.pt").is_file():
        t = cfg.teacher
        settings = TeacherTraining(
            epochs=t.epochs, batch_size=t.batch_size, optimizer=t.optimizer, lr=t.lr,
            weight_decay=t.weight_decay, augment=t.augment, label_smoothing=t.label_smoothing,
            seed=cfg.seed, device=t.device,
        )  # fmt: skip
        train_teacher(t.arch_spec(), splits, settings, out_dir=path, progress=progress)
    checkpoint = load_teacher(path, splits)
    model = checkpoint.model.eval()
    facts = dict(model_costs(model, splits.input_shape).as_dict())
    metrics = checkpoint.metrics
    for key, part in (("val_accuracy", splits.val), ("test_accuracy", splits.test)):
        facts[key] = float(metrics[key]) if key in metrics else evaluate_accuracy(model, *part)
    facts["arch"] = checkpoint.spec["base"]["arch"]
    return Teacher(path=path.resolve(), model=model, spec=checkpoint.spec, facts=facts)
