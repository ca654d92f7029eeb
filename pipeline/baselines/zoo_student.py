"""A hand-designed student: a zoo network as wide as a parameter budget allows (:func:`budget_student`)."""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any

import torch
from torch import nn

from envs.builders import build_model, resolve_arch
from envs.checkpoint import build_from_spec
from envs.costs import count_params
from envs.spec import base_spec, teacher_spec
from pipeline.baselines.budget import check_target

log = logging.getLogger(__name__)

_NARROWEST = 1e-3
"""A width at which every zoo layer is at its floor of 4 channels."""


def budget_student(
    arch: str, target_params: int, input_shape: list[int], num_classes: int, **kwargs: Any
) -> tuple[nn.Module, dict]:
    """A zoo network (or any builder taking ``width``) as wide as ``target_params`` allows.

    The width multiplier is found by binary search on models built on the meta device, then
    shortened to the fewest decimals with the same parameter count. The returned model is
    freshly initialised on the CPU: seed before calling.

    Args:
        arch: a zoo name (``"resnet18"``, ``"dwsep"``, ``"small_cnn"``, ...) or import path.
        target_params: the parameter budget.
        input_shape: ``[channels, height, width]`` of the inputs.
        num_classes: outputs of the classifier.
        **kwargs: further builder arguments (not ``width``); builders taking ``image_size``
            (the VGGs) get the input height unless given.

    Returns:
        ``(model, spec)`` with ``spec`` an unmodified-network student spec, so
        ``build_from_spec(spec)`` rebuilds the architecture.

    Raises:
        ValueError: a bad budget, ``width`` among ``kwargs``, or a budget below the narrowest
            network.
    """
    target = check_target(target_params)
    if "width" in kwargs:
        raise ValueError(
            f"budget_student chooses the width of {arch!r} itself; drop width={kwargs['width']!r}"
        )
    shape = [int(d) for d in input_shape]
    kw = {"num_classes": int(num_classes), "in_channels": shape[0], **kwargs}
    if "image_size" not in kw and "image_size" in inspect.signature(resolve_arch(arch)).parameters:
        kw["image_size"] = shape[1]

    def params(width: float) -> int:
        with torch.device("meta"):
            return count_params(build_model({"arch": arch, "kwargs": {**kw, "width": width}}))

    lo, hi = _NARROWEST, 1.0
    if (narrowest := params(lo)) > target:
        raise ValueError(
            f"budget {target:,} params is below the narrowest {arch!r} ({narrowest:,} params); "
            "raise the budget or choose a smaller architecture"
        )
    while params(hi) <= target:
        if hi >= 2**16:
            raise ValueError(
                f"{arch!r} still fits {target:,} params at width {hi:g}: its size does not "
                "follow its width argument; use a zoo architecture"
            )
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-7 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params(mid) <= target else (lo, mid)
    width, best = lo, params(lo)
    for digits in range(1, 8):  # the shortest width of the same size
        short = round(math.floor(lo * 10**digits) / 10**digits, digits)
        if short > 0 and params(short) == best:
            width = short
            break
    spec = teacher_spec(base_spec(arch, shape, **kw, width=width))
    model = build_from_spec(spec)
    log.info("%s at width %g: %d params (budget %d)", arch, width, count_params(model), target)
    return model, spec
