"""The few PyTorch helpers every stage uses: seeding, devices, accuracy and latency.

They sit below the data, the teacher and the children alike (``pipeline.data``,
``pipeline.children``), so that teacher training and child training measure the same way.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


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


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``x``, on the device the model lives on."""
    if len(y) == 0:
        raise ValueError("cannot measure accuracy on an empty set; check the dataset's split sizes")
    device = model_device(model)
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
    device = model_device(model) if device is None else resolve_device(device)
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
                sync(device)
                start = time.perf_counter()
                model(x)
                sync(device)
                samples.append(time.perf_counter() - start)
            timings[int(batch)] = float(np.median(samples))
    finally:
        model.train(was_training)
    return timings


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
