"""Network Slimming (Liu et al., 2017): train with an L1 penalty on BatchNorm scales
(:func:`bn_l1_penalty`), then drop the channels whose scales are smallest under one global
threshold (:func:`slim`), and repeat.

Channel pruning works on the coupled groups of ``envs.channels`` (residual additions,
BatchNorm and depthwise convs move together), so every result is a student with a canonical
spec: ``build_from_spec(spec)`` plus the result's ``state_dict`` rebuilds it exactly. No
function modifies its input.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from envs.channels import (
    channel_groups,
    channel_importance,
    dependency_graph,
    pruning_group,
)
from envs.costs import count_params
from envs.graph import describe
from envs.surgery import spec_of
from pipeline.baselines.budget import least_pruning, start

log = logging.getLogger(__name__)


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
    s = start(model, spec, target_params, min_channels)
    target, min_channels, spec, input_shape, gm = (s.target, s.min_channels, s.spec,
                                                   s.input_shape, s.model)  # fmt: skip
    if s.fits:
        return gm, spec_of(gm, spec)
    arch = describe(gm, input_shape, count_flops=False)
    dg = dependency_graph(gm, input_shape)
    order: list[tuple[float, int, int, str, int]] = []  # (score, group, rank, owner, channel)
    with_bn = 0
    for g, group in enumerate(channel_groups(gm, arch, dg)):
        root = gm.get_submodule(group.owner)
        full = pruning_group(dg, root, range(group.channels))
        try:
            scores = channel_importance(full, "bn")
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

    k = least_pruning(range(len(order) + 1), trial, target)
    child = _drop_channels(pristine, input_shape, drops(k))
    if count_params(child) != trial(k):
        log.warning("slimming: pruning changed more than module state; searching on copies")
        k = least_pruning(
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
