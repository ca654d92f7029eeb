"""Coupled channel groups and how to shrink them, through Torch-Pruning's ``DependencyGraph``.

A conv's output channels are tied to its BatchNorm, the next layers' inputs, every tensor
added to them by a residual connection and any depthwise conv in between: such a *group* is
pruned as one. Each group is decided by one unit (the first, in topological order, that
contains a layer of the group); the unit's keep-ratio sets the group's width and the most
important channels are kept (L1 norm of filters by default, BatchNorm gamma as in Network
Slimming as an option).

The input network is never modified: every function works on a deep copy. Every public
function works whatever the caller's grad mode: Torch-Pruning traces dependencies through
autograd, so it runs with gradients enabled and outside inference mode
(:func:`grad_mode_free`), and the networks it returns hold ordinary trainable tensors even
when built under ``torch.no_grad()`` or ``torch.inference_mode()``.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch_pruning as tp
from torch import nn

from envs.graph import LAYER_TYPES, Architecture, describe, trace

DEFAULT_RATIOS = tuple(round(0.1 * i, 1) for i in range(1, 11))
IMPORTANCE = ("l1", "l2", "bn", "fpgm")

_F = TypeVar("_F", bound=Callable[..., Any])


def grad_mode_free(fn: _F) -> _F:
    """Runs ``fn`` with autograd on and inference mode off, whatever the caller's mode.

    Torch-Pruning's ``DependencyGraph`` follows ``grad_fn`` links (under ``torch.no_grad()`` it
    fails an assertion), and tensors made in inference mode could never be trained.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False), torch.enable_grad():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class ChannelGroup:
    """Output channels that must be pruned together."""

    owner: str
    """Module path of the group's first layer: the group's key in a spec's ``channels``."""
    unit: str
    """The unit whose keep-ratio decides the group."""
    layers: tuple[str, ...]
    """Every conv/linear whose output channels belong to the group."""
    channels: int


def validate_ratio(ratio: float, where: str = "keep-ratio") -> float:
    """Returns ``ratio`` if it lies in (0, 1], else raises ``ValueError``."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"{where} {ratio!r} is not a number in (0, 1]") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(
            f"{where} {ratio!r} is outside (0, 1]: use a fraction of channels to keep, e.g. 0.5"
        )
    return value


@grad_mode_free
def dependency_graph(model: nn.Module, input_shape: Sequence[int]) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model``, traced in eval mode (statistics kept)."""
    was = model.training
    model.eval()
    try:
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=torch.zeros(1, *input_shape), verbose=False
        )
    finally:
        model.train(was)


@grad_mode_free
def pruning_group(dg: tp.DependencyGraph, module: nn.Module, idxs: Iterable[int]) -> tp.Group:
    """The coupled group that removes output channels ``idxs`` of ``module`` everywhere."""
    return dg.get_pruning_group(module, _out_pruner(dg, module), sorted(idxs))


def _out_pruner(dg: tp.DependencyGraph, module: nn.Module):  # noqa: ANN202
    pruner = dg.get_pruner_of_module(module)
    return None if pruner is None else pruner.prune_out_channels


@grad_mode_free
def channel_groups(
    model: nn.Module, arch: Architecture, dg: tp.DependencyGraph | None = None
) -> list[ChannelGroup]:
    """The coupled output-channel groups of ``model``, each assigned to its deciding unit.

    Groups that include the network output (the classifier's classes) are left out.
    """
    dg = dg or dependency_graph(model, arch.input_shape)
    names = {m: n for n, m in model.named_modules()}
    unit_of = {mod: u.name for u in arch.units for mod in u.modules}
    output_layers = set(classifier_layers(arch))
    seen: set[str] = set()
    groups: list[ChannelGroup] = []
    for unit in arch.units:
        for path in unit.modules:
            module = model.get_submodule(path)
            if path in seen or not isinstance(module, LAYER_TYPES):
                continue
            fn = _out_pruner(dg, module)
            if fn is None:
                continue
            n_out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            group = dg.get_pruning_group(module, fn, list(range(n_out)))
            layers = [
                names[dep.target.module]
                for dep, _ in group
                if dg.is_out_channel_pruning_fn(dep.handler)
                and isinstance(dep.target.module, LAYER_TYPES)
            ]
            layers = list(dict.fromkeys(layers))
            seen.update(layers)
            if output_layers & set(layers):
                continue
            owner_unit = min((unit_of[p] for p in layers if p in unit_of), key=_unit_order(arch))
            groups.append(ChannelGroup(path, owner_unit, tuple(layers), int(n_out)))
    return groups


def classifier_layers(arch: Architecture) -> list[str]:
    """Module paths of the layers whose outputs are the network's outputs (the classes)."""
    return [u.modules[0] for u in arch.units if u.why_not and u.why_not.startswith("classifier")]


def _unit_order(arch: Architecture):  # noqa: ANN202
    order = {u.name: i for i, u in enumerate(arch.units)}
    return lambda name: order[name]


IMPORTANCE_CLASSES: dict[str, Callable[[], tp.importance.Importance]] = {
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1, normalizer=None),
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2, normalizer=None),
    "bn": lambda: tp.importance.BNScaleImportance(normalizer=None),
    "fpgm": lambda: tp.importance.FPGMImportance(normalizer=None),
}
"""Torch-Pruning's importance criteria by name: group L1 and L2 norms (a channel's output
filters, the input weights that read it and its BatchNorm scales, averaged over the group's
layers), BatchNorm scale (Network Slimming's ``|gamma|``) and FPGM (distance to the group's
geometric median)."""


@grad_mode_free
def channel_importance(group: tp.Group, kind: str = "l1") -> torch.Tensor:
    """Importance of each channel of a coupled group, in the root layer's channel order, by
    one of Torch-Pruning's criteria (:data:`IMPORTANCE_CLASSES`).

    Raises:
        ValueError: an unknown criterion, or ``"bn"`` for a group without BatchNorm.
    """
    if kind not in IMPORTANCE_CLASSES:
        raise ValueError(f"unknown importance {kind!r}: use one of {list(IMPORTANCE)}")
    scores = IMPORTANCE_CLASSES[kind]()(group)
    if not isinstance(scores, torch.Tensor) or scores.numel() == 0:
        raise ValueError(f"importance {kind!r} found no layer to judge the group's channels by")
    return scores.float()


def kept_channels(channels: int, ratio: float, min_channels: int) -> int:
    """How many of ``channels`` a keep-ratio keeps: ``round(ratio * channels)``, floored."""
    return min(channels, max(min_channels, round(ratio * channels)))


@grad_mode_free
def shrink(
    model: nn.Module,
    ratios: Mapping[str, float],
    input_shape: Sequence[int],
    min_channels: int = 4,
    importance: str = "l1",
) -> nn.Module:
    """Returns a copy of ``model`` with each named unit's channel groups shrunk to its ratio.

    Raises:
        ValueError: an unknown or unshrinkable unit, or a ratio outside (0, 1].
    """
    gm = copy.deepcopy(trace(model))
    arch = describe(gm, input_shape, count_flops=False)
    units = {u.name: u for u in arch.units}
    for name, ratio in ratios.items():
        validate_ratio(ratio, f"keep-ratio for unit {name!r}")
        if name not in units:
            raise ValueError(f"unit {name!r} does not exist; units are {list(units)}")
    if all(float(r) == 1.0 for r in ratios.values()):
        return gm
    dg = dependency_graph(gm, input_shape)
    groups = channel_groups(gm, arch, dg)
    owned = {g.unit for g in groups}
    for name in ratios:
        if name not in owned:
            raise ValueError(
                f"unit {name!r} cannot be shrunk: {why_not_shrinkable(units[name], groups)}"
            )
    for group in groups:
        ratio = float(ratios.get(group.unit, 1.0))
        keep = kept_channels(group.channels, ratio, min_channels)
        if keep >= group.channels:
            continue
        root = gm.get_submodule(group.owner)
        full = dg.get_pruning_group(root, _out_pruner(dg, root), list(range(group.channels)))
        scores = channel_importance(full, importance)
        drop = scores.argsort()[: group.channels - keep].tolist()
        dg.get_pruning_group(root, _out_pruner(dg, root), sorted(drop)).prune()
    return gm


def why_not_shrinkable(unit: Any, groups: list[ChannelGroup]) -> str:
    if unit.why_not and unit.why_not.startswith("classifier"):
        return "its outputs are the classes"
    deciders = sorted({g.unit for g in groups if set(g.layers) & set(unit.modules)})
    if deciders:
        return f"its channels are tied to and decided by unit(s) {deciders}"
    return "it has no prunable output channels"


@grad_mode_free
def set_channels(
    model: nn.Module, channels: Mapping[str, int], input_shape: Sequence[int]
) -> nn.Module:
    """Returns a copy of ``model`` with each group (by owner) cut to a channel count.

    Used to rebuild a student's shapes from its spec; the weights are loaded afterwards.
    """
    gm = copy.deepcopy(trace(model))
    arch = describe(gm, input_shape, count_flops=False)
    dg = dependency_graph(gm, input_shape)
    groups = {g.owner: g for g in channel_groups(gm, arch, dg)}
    for owner, n in channels.items():
        if owner not in groups:
            raise ValueError(
                f"spec names channel group {owner!r}, which this network does not have"
            )
        g = groups[owner]
        if not 0 < n <= g.channels:
            raise ValueError(f"spec asks {n} channels for group {owner!r}, which has {g.channels}")
        if n < g.channels:
            root = gm.get_submodule(owner)
            dg.get_pruning_group(root, _out_pruner(dg, root), list(range(n, g.channels))).prune()
    return gm


@grad_mode_free
def current_channels(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """Output channels of every coupled group, keyed by owner: the spec's ``channels``."""
    gm = trace(model)
    return {
        g.owner: g.channels
        for g in channel_groups(gm, describe(gm, input_shape, count_flops=False))
    }
