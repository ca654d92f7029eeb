"""Structured L1 pruning (Li et al., 2017) through Torch-Pruning's ``BasePruner`` and group L1
importance, the same ratio in every layer or one global ranking (:func:`structured_l1`).

Every result is a student with a canonical spec (``envs.spec``). No function modifies its input.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from fractions import Fraction
from itertools import pairwise

import torch
import torch.fx as fx
import torch_pruning as tp
from torch import nn

from envs.channels import (
    channel_groups,
    classifier_layers,
)
from envs.costs import count_params
from envs.graph import describe
from envs.surgery import spec_of
from pipeline.baselines.budget import least_pruning, start

log = logging.getLogger(__name__)

MODES = ("uniform", "global")


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
    s = start(model, spec, target_params, min_channels)
    target, min_channels, spec, input_shape, gm = (s.target, s.min_channels, s.spec,
                                                   s.input_shape, s.model)  # fmt: skip
    if s.fits:
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

    child = built[least_pruning(range(len(ratios)), params_of, target)] if ratios else gm
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
