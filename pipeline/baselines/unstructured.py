"""L1 unstructured pruning (``torch.nn.utils.prune``): zero the smallest-magnitude weights of
every conv/linear layer, with one global threshold or the same fraction per layer. The network
keeps its shape; only its count of nonzero parameters drops. No function modifies its input.
"""

from __future__ import annotations

import copy
import logging
import numbers

import torch
from torch import nn
from torch.nn.utils import prune

from envs.graph import LAYER_TYPES

log = logging.getLogger(__name__)

PRUNABLE = LAYER_TYPES
"""Layer types whose ``weight`` unstructured pruning masks: conv (1-3d) and linear."""
SCOPES = ("global", "layer")


def prune_unstructured(model: nn.Module, amount: float, scope: str = "global") -> nn.Module:
    """A copy of ``model`` with the smallest-magnitude conv/linear weights masked to zero.

    The masks stay as reparametrisations (``weight = weight_orig * weight_mask``), so that
    fine-tuning keeps the pruned weights at zero; call :func:`make_permanent` before saving.

    Args:
        model: the network to prune; it is not modified.
        amount: fraction of weights to zero, in [0, 1).
        scope: ``"global"`` ranks all prunable weights together (``global_unstructured``
            with ``L1Unstructured``); ``"layer"`` zeroes ``round(amount * n)`` of each layer's
            ``n`` weights (``l1_unstructured``).

    Raises:
        ValueError: ``amount`` outside [0, 1), an unknown ``scope``, or no conv/linear layer.
    """
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real) or not 0 <= amount < 1:
        raise ValueError(
            f"pruning amount {amount!r} is outside [0, 1): give the fraction of weights to "
            "zero, e.g. 0.5"
        )
    if scope not in SCOPES:
        raise ValueError(
            f"unstructured pruning scope {scope!r} is unknown: use 'global' (one threshold over "
            "all layers) or 'layer' (the same fraction in every layer)"
        )
    pruned = copy.deepcopy(model)
    targets = [(m, "weight") for m in pruned.modules() if isinstance(m, PRUNABLE)]
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no conv or linear layer to prune; "
            "unstructured pruning masks the weights of those layers only"
        )
    if scope == "global":
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    else:
        for module, name in targets:
            prune.l1_unstructured(module, name, amount=amount)
    return pruned


def make_permanent(model: nn.Module) -> nn.Module:
    """Folds every pruning mask into its weight, in place, and returns ``model``.

    Afterwards the ``state_dict`` has plain ``weight`` keys again (and the same zeros), so the
    model loads into the unpruned architecture.
    """
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    return model


def sparsity(model: nn.Module) -> dict[str, int | float]:
    """Counts of a (possibly masked) model's parameters and zeros.

    Returns:
        ``params``: parameters, zeros included; ``nonzero_params``: parameters that are not
        zero, with masks applied where still reparametrised; ``prunable``: entries of
        conv/linear weights; ``prunable_zeros``: zeros among them; ``sparsity``:
        ``prunable_zeros / prunable``.
    """
    params = nonzero = prunable = zeros = 0
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            value = param.detach()
            base = name.removesuffix("_orig")
            mask = getattr(module, f"{base}_mask", None) if name.endswith("_orig") else None
            if isinstance(mask, torch.Tensor):
                value = value * mask
            n, nz = value.numel(), int(torch.count_nonzero(value))
            params += n
            nonzero += nz
            if isinstance(module, PRUNABLE) and base == "weight":
                prunable += n
                zeros += n - nz
    return {
        "params": params,
        "nonzero_params": nonzero,
        "prunable": prunable,
        "prunable_zeros": zeros,
        "sparsity": zeros / prunable if prunable else 0.0,
    }
