"""What a model costs: parameters, FLOPs (PyTorch's own counter) and size in bytes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Costs:
    """Static costs of one model for one input shape."""

    params: int
    """Number of parameters (BatchNorm buffers excluded)."""
    flops: int
    """Floating-point operations of one forward pass at batch size 1 (a multiply-add is 2)."""
    size_bytes: int
    """Bytes of the state_dict tensors: parameters plus buffers, as stored on disk."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass of a single example, counted by ``torch.utils.flop_counter``."""
    device = next(model.parameters()).device
    x = torch.zeros(1, *input_shape, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def size_bytes(model: nn.Module) -> int:
    """Bytes of all state_dict tensors."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def model_costs(model: nn.Module, input_shape: Sequence[int]) -> Costs:
    """Parameters, FLOPs and size of ``model`` for inputs of ``input_shape`` (C, H, W)."""
    return Costs(count_params(model), count_flops(model, input_shape), size_bytes(model))


def fits(model: nn.Module, input_shape: Sequence[int], limits: Mapping[str, int]) -> bool:
    """Whether ``model`` is within ``limits`` (``{"params": N, "flops": F}``)."""
    costs = model_costs(model, input_shape)
    return all(getattr(costs, key) <= limit for key, limit in limits.items())


def highest_level(fit: Callable[[int], bool], high: int) -> int:
    """The highest level in ``[0, high]`` at which ``fit`` holds, by bisection (``fit`` is
    monotone: what fits at a level fits at every lower one); 0 when none does."""
    low = 0
    while low < high:
        mid = (low + high + 1) // 2
        if fit(mid):
            low = mid
        else:
            high = mid - 1
    return low
