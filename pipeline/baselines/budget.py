"""What every budgeted method shares: checked budgets, and the least pruning that meets one.

Budgets are met by binary search over how much to prune, which is monotone in the parameter
count, so the result is the least pruning that fits.
"""

from __future__ import annotations

import copy
import logging
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from envs.costs import count_params
from envs.graph import trace
from envs.spec import canonical

log = logging.getLogger(__name__)


def least_pruning(candidates: range, params_of: Callable[[int], int], target: int) -> int:
    """The first candidate whose child has at most ``target`` parameters, else the last.

    Candidates are ordered by increasing pruning, so parameter counts never increase; the
    last one is tried first.
    """
    lo, hi = candidates.start, candidates.stop - 1
    if params_of(hi) > target:
        return hi
    while lo < hi:
        mid = (lo + hi) // 2
        if params_of(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    return hi


def check_target(target_params: Any) -> int:
    if (
        isinstance(target_params, bool)
        or not isinstance(target_params, numbers.Real)
        or not target_params >= 1
    ):
        raise ValueError(
            f"parameter budget {target_params!r} is not a positive count: give e.g. 50000"
        )
    return int(target_params)


def check_min_channels(min_channels: Any) -> int:
    if isinstance(min_channels, bool) or not isinstance(min_channels, numbers.Integral):
        raise ValueError(f"min_channels {min_channels!r} is not an integer: give e.g. 4")
    if min_channels < 1:
        raise ValueError(f"min_channels {min_channels} is below 1: give e.g. 4")
    return int(min_channels)


@dataclass
class Start:
    """What a budgeted channel-pruning method starts from: a traced copy of the model."""

    target: int
    min_channels: int
    spec: dict[str, Any]
    input_shape: list[int]
    model: fx.GraphModule
    fits: bool
    """The model is already within the budget: the method returns it as it is."""


def start(model: nn.Module, spec: dict[str, Any], target_params: Any, min_channels: Any) -> Start:
    """Checks a method's budget and floor and traces a copy of the model to prune."""
    target = check_target(target_params)
    min_channels = check_min_channels(min_channels)
    spec = canonical(spec)
    gm = copy.deepcopy(trace(model))
    return Start(target, min_channels, spec, spec["base"]["input_shape"], gm,
                 count_params(gm) <= target)  # fmt: skip
