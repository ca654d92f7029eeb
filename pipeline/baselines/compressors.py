"""The classic compressors, as pure model transformations: the baselines N2N is compared to.

- **L1 unstructured pruning** (``torch.nn.utils.prune``): zero the smallest-magnitude weights
  of every conv/linear layer, with one global threshold or the same fraction per layer. The
  network keeps its shape; only its count of nonzero parameters drops.
- **Network Slimming** (Liu et al., 2017): train with an L1 penalty on BatchNorm scales
  (:func:`bn_l1_penalty`), then drop the channels whose scales are smallest under one global
  threshold (:func:`slim`), and repeat.
- **Structured L1 pruning** (Li et al., 2017) through Torch-Pruning's ``BasePruner`` and group
  L1 importance, the same ratio in every layer or one global ranking (:func:`structured_l1`).
- **A hand-designed student** from the zoo, as wide as the budget allows (:func:`budget_student`).

Channel pruning works on the coupled groups of ``envs.surgery`` (residual additions,
BatchNorm and depthwise convs move together), so every structured result is a student with a
canonical spec: ``build_from_spec(spec)`` plus the result's ``state_dict`` rebuilds it exactly.
No function modifies its input. Budgets are met by binary search over how much to prune,
which is monotone in the parameter count, so the result is the least pruning that fits.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import numbers
from collections import defaultdict
from collections.abc import Callable, Sequence
from fractions import Fraction
from itertools import pairwise
from typing import Any

import torch
import torch.fx as fx
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune

from envs.builders import build_model, resolve_arch
from envs.channels import (
    channel_groups,
    channel_importance,
    classifier_layers,
    dependency_graph,
    pruning_group,
)
from envs.checkpoint import build_from_spec
from envs.costs import count_params
from envs.graph import LAYER_TYPES, describe, trace
from envs.spec import base_spec, canonical, teacher_spec
from envs.surgery import spec_of

__all__ = [
    "PRUNABLE",
    "bn_l1_penalty",
    "budget_student",
    "make_permanent",
    "prune_unstructured",
    "slim",
    "sparsity",
    "spec_of",
    "structured_l1",
]

log = logging.getLogger(__name__)

PRUNABLE = LAYER_TYPES
"""Layer types whose ``weight`` unstructured pruning masks: conv (1-3d) and linear."""
SCOPES = ("global", "layer")
MODES = ("uniform", "global")
_NARROWEST = 1e-3
"""A width at which every zoo layer is at its floor of 4 channels."""

# --- unstructured ------------------------------------------------------------------------


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


# --- Network Slimming --------------------------------------------------------------------


def bn_l1_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of ``|gamma|`` over the affine BatchNorm layers: Network Slimming's sparsity term.

    Add it to the training loss times a small coefficient (1e-4 in the paper) to push the
    scales of unneeded channels towards zero. Zero for a model without BatchNorm.
    """
    terms = [
        m.weight.abs().sum()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
    ]
    if not terms:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    return torch.stack(terms).sum()


def slim(
    model: nn.Module, spec: dict, target_params: int, min_channels: int = 4
) -> tuple[nn.Module, dict]:
    """One Network-Slimming pruning round: drop the channels with the smallest BatchNorm scales.

    All coupled channel groups (see ``envs.channels.channel_groups``) are ranked together under
    one threshold; a group's score per channel is the mean ``|gamma|`` of its BatchNorms, so
    groups coupling many BatchNorms (a residual stage) are not favoured. The globally
    smallest channels go first, as few as needed for the child to have at most
    ``target_params`` parameters; no group drops below ``min_channels``, and groups without
    BatchNorm are left whole. Within each group the kept channels are those with the largest
    scores.

    Args:
        model: the network ``spec`` describes, normally after sparsity training; not modified.
        spec: its student spec.
        target_params: the parameter budget of the child.
        min_channels: the fewest channels a group keeps.

    Returns:
        ``(child, canonical child spec)``. The child is an exact copy when ``model`` already
        fits; when even the smallest reachable child does not fit it is returned, and its
        parameter count shows the caller that the budget is out of reach.

    Raises:
        ValueError: a bad budget or ``min_channels``, or no channel group has a BatchNorm.
    """
    target = _check_target(target_params)
    min_channels = _check_min_channels(min_channels)
    spec = canonical(spec)
    input_shape = spec["base"]["input_shape"]
    gm = copy.deepcopy(trace(model))
    if count_params(gm) <= target:
        return gm, spec_of(gm, spec)
    arch = describe(gm, input_shape, count_flops=False)
    dg = dependency_graph(gm, input_shape)
    order: list[tuple[float, int, int, str, int]] = []  # (score, group, rank, owner, channel)
    with_bn = 0
    for g, group in enumerate(channel_groups(gm, arch, dg)):
        root = gm.get_submodule(group.owner)
        full = pruning_group(dg, root, range(group.channels))
        try:
            scores = channel_importance(full, dg, "bn", reduction="mean")
        except ValueError:
            continue  # no BatchNorm scale to judge these channels by
        with_bn += 1
        ranked = torch.argsort(scores, stable=True)[: max(group.channels - min_channels, 0)]
        order += [(float(scores[c]), g, r, group.owner, c) for r, c in enumerate(ranked.tolist())]
    if not with_bn:
        raise ValueError(
            f"Network Slimming needs BatchNorm layers, and {spec['base']['arch']!r} has none in "
            "a prunable channel group; use structured-l1 instead"
        )
    order.sort()

    def drops(k: int) -> dict[str, list[int]]:
        chosen: dict[str, list[int]] = defaultdict(list)
        for *_, owner, channel in order[:k]:
            chosen[owner].append(channel)
        return chosen

    # Trial cuts prune one working copy in place and undo it, so the search needs one
    # dependency graph instead of one per trial; the child itself is cut from a clean copy.
    pristine = copy.deepcopy(gm)
    state = _module_state(gm)

    def trial(k: int) -> int:
        _restore(state)
        for owner, channels in drops(k).items():
            root = gm.get_submodule(owner)
            pruning_group(dg, root, channels).prune()
        return count_params(gm)

    k = _least_pruning(range(len(order) + 1), trial, target)
    child = _drop_channels(pristine, input_shape, drops(k))
    if count_params(child) != trial(k):
        log.warning("slimming: pruning changed more than module state; searching on copies")
        k = _least_pruning(
            range(len(order) + 1),
            lambda k: count_params(_drop_channels(pristine, input_shape, drops(k))),
            target,
        )
        child = _drop_channels(pristine, input_shape, drops(k))
    log.info(
        "slimming: %d -> %d params (budget %d)", count_params(pristine), count_params(child), target
    )
    return child, spec_of(child, spec)


def _drop_channels(
    gm: fx.GraphModule, input_shape: Sequence[int], drops: dict[str, list[int]]
) -> fx.GraphModule:
    """A copy of ``gm`` without the listed output channels of each group (keyed by owner)."""
    child = copy.deepcopy(gm)
    dg = dependency_graph(child, input_shape)
    for owner, channels in drops.items():
        root = child.get_submodule(owner)
        pruning_group(dg, root, channels).prune()
    return child


def _module_state(model: nn.Module) -> list[tuple[nn.Module, dict, dict, dict]]:
    """What Torch-Pruning's pruning functions replace: parameters, buffers, size attributes."""
    return [
        (
            m,
            dict(m._parameters),
            dict(m._buffers),
            {k: v for k, v in vars(m).items() if k[0] != "_"},
        )
        for m in model.modules()
    ]


def _restore(state: list[tuple[nn.Module, dict, dict, dict]]) -> None:
    for module, params, buffers, attrs in state:
        module._parameters.clear()
        module._parameters.update(params)
        module._buffers.clear()
        module._buffers.update(buffers)
        vars(module).update(attrs)


# --- structured L1 -----------------------------------------------------------------------


def structured_l1(
    model: nn.Module,
    spec: dict,
    target_params: int,
    mode: str = "uniform",
    min_channels: int = 4,
) -> tuple[nn.Module, dict]:
    """Channel pruning by group L1 norm (Li et al.), with Torch-Pruning's ``BasePruner``.

    Importance is ``tp.importance.GroupMagnitudeImportance(p=1)``: the L1 norm of every
    coupled layer's weights for the channel, averaged over the group and divided by the
    group's mean. The pruning ratio is the smallest that gets the child to at most
    ``target_params`` parameters, found by binary search over the ratios at which the
    pruned channel counts change; no group drops below ``min_channels``, and the classifier's
    outputs are never pruned.

    Args:
        model: the network ``spec`` describes; not modified.
        spec: its student spec.
        target_params: the parameter budget of the child.
        mode: ``"uniform"`` prunes the same fraction of every group; ``"global"`` ranks all
            channels together (Torch-Pruning's ``global_pruning``).
        min_channels: the fewest channels a group keeps.

    Returns:
        ``(child, canonical child spec)``; an exact copy when ``model`` already fits, the
        smallest reachable child when nothing fits.

    Raises:
        ValueError: an unknown mode, a bad budget or ``min_channels``.
    """
    if mode not in MODES:
        raise ValueError(
            f"structured pruning mode {mode!r} is unknown: use 'uniform' (the same ratio per "
            "layer) or 'global' (one ranking over all channels)"
        )
    target = _check_target(target_params)
    min_channels = _check_min_channels(min_channels)
    spec = canonical(spec)
    input_shape = spec["base"]["input_shape"]
    gm = copy.deepcopy(trace(model))
    if count_params(gm) <= target:
        return gm, spec_of(gm, spec)
    arch = describe(gm, input_shape, count_flops=False)
    sizes = [g.channels for g in channel_groups(gm, arch)]
    ignored = classifier_layers(arch)
    # Uniform keeps int(n * (1 - ratio)) of each group's n channels, global int(N * (1 - ratio))
    # of all N: between consecutive kept fractions j / n the child does not change.
    pools = sizes if mode == "uniform" else [sum(sizes)]
    kept = sorted({Fraction(j, n) for n in pools if n for j in range(n + 1)})
    ratios = [float(1 - (a + b) / 2) for a, b in reversed(list(pairwise(kept)))]

    built: dict[int, nn.Module] = {}  # the child of the best index so far, not every trial

    def params_of(i: int) -> int:
        child = _tp_prune(gm, input_shape, ratios[i], mode == "global", ignored, min_channels)
        n = count_params(child)
        if n <= target or i == len(ratios) - 1:
            built.clear()
            built[i] = child
        return n

    child = built[_least_pruning(range(len(ratios)), params_of, target)] if ratios else gm
    log.info(
        "structured L1 (%s): %d -> %d params (budget %d)",
        mode,
        count_params(gm),
        count_params(child),
        target,
    )
    return child, spec_of(child, spec)


def _tp_prune(
    gm: fx.GraphModule,
    input_shape: Sequence[int],
    ratio: float,
    global_pruning: bool,
    ignored: Sequence[str],
    min_channels: int,
) -> fx.GraphModule:
    """A copy of ``gm`` pruned by Torch-Pruning at one ratio, no group below ``min_channels``."""
    child = copy.deepcopy(gm)
    modes = [m.training for m in child.modules()]
    child.eval()  # tracing runs a forward pass: leave the BatchNorm statistics alone
    pruner = tp.pruner.BasePruner(
        child,
        example_inputs=torch.zeros(1, *input_shape),
        importance=tp.importance.GroupMagnitudeImportance(p=1),
        global_pruning=global_pruning,
        pruning_ratio=ratio,
        ignored_layers=[child.get_submodule(path) for path in ignored],
    )
    dg = pruner.DG
    # Torch-Pruning skips a group it would empty (a uniform ratio near 1, or a global
    # threshold above all of the group's scores), which would make the parameter count jump
    # back up as the ratio grows; min_channels below is the guard instead.
    dg.check_pruning_group = lambda group: True
    plans = []
    # Interactive: Torch-Pruning proposes each group's channels; a group it would cut below
    # min_channels keeps its most important ones. Scores are all taken before any pruning.
    for group in pruner.step(interactive=True):
        root, fn = group[0].dep.target.module, group[0].dep.handler
        idxs = [int(i) for i in group[0].idxs]
        room = dg.get_out_channels(root) - min_channels
        if len(idxs) > room:
            if room <= 0:
                continue
            full = dg.get_pruning_group(root, fn, list(range(dg.get_out_channels(root))))
            imp = pruner.estimate_importance(full)
            idxs = sorted(idxs, key=lambda i: float(imp[i]))[:room]
        plans.append((root, fn, sorted(idxs)))
    for root, fn, idxs in plans:
        dg.get_pruning_group(root, fn, idxs).prune()
    for module, training in zip(child.modules(), modes, strict=True):
        module.training = training
    return child


# --- hand-designed student ---------------------------------------------------------------


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
    target = _check_target(target_params)
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


# --- shared ------------------------------------------------------------------------------


def _least_pruning(candidates: range, params_of: Callable[[int], int], target: int) -> int:
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


def _check_target(target_params: Any) -> int:
    if (
        isinstance(target_params, bool)
        or not isinstance(target_params, numbers.Real)
        or not target_params >= 1
    ):
        raise ValueError(
            f"parameter budget {target_params!r} is not a positive count: give e.g. 50000"
        )
    return int(target_params)


def _check_min_channels(min_channels: Any) -> int:
    if isinstance(min_channels, bool) or not isinstance(min_channels, numbers.Integral):
        raise ValueError(f"min_channels {min_channels!r} is not an integer: give e.g. 4")
    if min_channels < 1:
        raise ValueError(f"min_channels {min_channels} is below 1: give e.g. 4")
    return int(min_channels)
