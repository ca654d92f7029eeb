"""Model surgery that keeps the teacher's weights: remove units, shrink channels.

Removal rewires the traced graph so that a removed unit's input feeds its users, then erases
the unit. When the unit changed the channel count, the next conv/linear layer is rebuilt
for its new input width, keeping the teacher's weights for the input channels that survive
(the ones it weighted most, by L1 norm); should the input grow instead, the new input
channels get zero weights so the surviving ones compute exactly what they did.

Shrinkage works on coupled channel groups found by Torch-Pruning's ``DependencyGraph``:
a conv's output channels are tied to its BatchNorm, the next layers' inputs, every tensor
added to them by a residual connection and any depthwise conv in between. Each group is
decided by one unit (the first, in topological order, that contains a layer of the group);
the unit's keep-ratio sets the group's width and the most important channels are kept (L1
norm of filters by default, BatchNorm gamma as in Network Slimming as an option).

The teacher is never modified: every function works on a deep copy. Every public function
works whatever the caller's grad mode: Torch-Pruning traces dependencies through autograd, so
surgery runs with gradients enabled and outside inference mode (:func:`grad_mode_free`), and
the children it returns hold ordinary trainable tensors even when built under
``torch.no_grad()`` or ``torch.inference_mode()``.

Removal can make a network *larger*: a unit that narrows the channels (say 240 -> 80, an
inverted residual's projection) hands its wide input to the next layer, whose new input
weights may outnumber the unit's own. ``make_child(..., allow_growth=False)`` (what the
removal environment uses) drops such removals from the request; see :func:`remove_without_growth`.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.fx as fx
import torch_pruning as tp
from torch import nn

from envs.costs import count_params
from envs.graph import LAYER_TYPES, Architecture, describe, trace
from envs.models import build_model
from envs.spec import SPEC_FORMAT, canonical

log = logging.getLogger(__name__)

DEFAULT_RATIOS = tuple(round(0.1 * i, 1) for i in range(1, 11))
IMPORTANCE = ("l1", "bn")

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


# --- removal -----------------------------------------------------------------------------


@grad_mode_free
def remove_units(model: nn.Module, names: Iterable[str], input_shape: Sequence[int]) -> nn.Module:
    """Returns a copy of ``model`` without the named units (see ``envs.graph``).

    Raises:
        ValueError: a name is not a unit, or the unit is not removable (the message says why).
    """
    names = list(dict.fromkeys(names))
    gm = copy.deepcopy(trace(model))
    if not names:
        return gm
    arch = describe(gm, input_shape, count_flops=False)
    units = {u.name: u for u in arch.units}
    for name in names:
        if name not in units:
            raise ValueError(f"unit {name!r} does not exist; units are {list(units)}")
        if not units[name].removable:
            raise ValueError(f"unit {name!r} cannot be removed: {units[name].why_not}")
    by_name = {n.name: n for n in gm.graph.nodes}
    replaced: dict[str, fx.Node] = {}  # erased output -> the node that now stands for it
    for unit in (u for u in arch.units if u.name in names):  # topological order
        source = by_name[unit.input_node]
        while source.name in replaced:
            source = replaced[source.name]
        by_name[unit.output_node].replace_all_uses_with(source)
        replaced[unit.output_node] = source
        for node_name in reversed(unit.nodes):
            gm.graph.erase_node(by_name[node_name])
    gm.graph.lint()
    gm.recompile()
    _AdaptInputs(gm).run(torch.zeros(1, *input_shape))
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


class _AdaptInputs(fx.Interpreter):
    """Runs the graph and rebuilds every layer whose input width no longer matches."""

    @torch.no_grad()
    def call_module(self, target: str, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        x = args[0]
        if isinstance(module, LAYER_TYPES) and isinstance(x, torch.Tensor):
            got = x.shape[-1] if isinstance(module, nn.Linear) else x.shape[1]
            want = module.in_features if isinstance(module, nn.Linear) else module.in_channels
            if got != want:
                module = _with_inputs(module, int(got))
                _set_submodule(self.module, target, module)
        was = module.training
        module.eval()
        try:
            return module(*args, **kwargs)
        finally:
            module.train(was)


def _with_inputs(layer: nn.Module, n_in: int) -> nn.Module:
    """A copy of a conv/linear layer taking ``n_in`` inputs, keeping the teacher's weights."""
    if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d) and layer.groups != 1:
        raise ValueError(f"cannot change the input width of grouped convolution {layer}")
    new = copy.deepcopy(layer)
    w = layer.weight.detach()
    old_in = w.shape[1]
    if n_in <= old_in:
        dims = [d for d in range(w.dim()) if d != 1]
        keep = w.abs().sum(dim=dims).argsort(descending=True)[:n_in].sort().values
        new_w = w.index_select(1, keep).clone()
    else:
        shape = list(w.shape)
        shape[1] = n_in - old_in
        new_w = torch.cat([w, w.new_zeros(shape)], dim=1)
    new.weight = nn.Parameter(new_w)
    if isinstance(new, nn.Linear):
        new.in_features = n_in
    else:
        new.in_channels = n_in
    return new


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@grad_mode_free
def remove_without_growth(
    model: nn.Module, names: Iterable[str], input_shape: Sequence[int]
) -> tuple[fx.GraphModule, list[str]]:
    """Removes the named units except those whose removal would make the network larger.

    Only removing a unit that narrows the channels (more input than output channels) can add
    parameters: its consumer is widened to the unit's input. Without such removals every
    surviving layer reads at most as many channels as before, so the network cannot grow. Hence:
    when removing all ``names`` does not grow the network, that is the child (one surgery).
    Otherwise the other removals are made, then each requested narrowing unit, in topological
    order, is removed too unless that makes the child larger than it was without it. The
    result is deterministic and never has more parameters than ``model``.

    Returns:
        The child and the removals made (a sub-list of ``names``, in their order).

    Raises:
        ValueError: as :func:`remove_units`.
    """
    names = list(dict.fromkeys(names))
    model = trace(model)
    child = remove_units(model, names, input_shape)
    if count_params(child) <= count_params(model):
        return child, names
    arch = describe(model, input_shape, count_flops=False)
    narrowing = {u.name for u in arch.units if u.name in names and u.in_channels > u.out_channels}
    kept = [n for n in names if n not in narrowing]
    child = remove_units(model, kept, input_shape)
    for unit in (u for u in arch.units if u.name in narrowing):  # topological order
        trial = remove_units(model, [*kept, unit.name], input_shape)
        if count_params(trial) <= count_params(child):
            kept.append(unit.name)
            child = trial
    dropped = [n for n in names if n not in kept]
    log.debug("removal of %s left out: it would make the network larger", dropped)
    return child, [n for n in names if n in kept]


# --- shrinkage ---------------------------------------------------------------------------


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


@grad_mode_free
def channel_importance(
    group: Any, dg: tp.DependencyGraph, kind: str = "l1", reduction: str = "sum"
) -> torch.Tensor:
    """Importance of each channel of a coupled group, in the root layer's channel order.

    ``"l1"`` sums the L1 norms of the output filters of every conv/linear layer in the group
    (the filter-norm criterion of Li et al., extended to coupled layers); ``"bn"`` sums the
    absolute BatchNorm scales, as Network Slimming does. ``reduction="mean"`` averages over
    the group's layers instead, so that scores of groups with more layers stay comparable.
    """
    if kind not in IMPORTANCE:
        raise ValueError(f"unknown importance {kind!r}: use one of {list(IMPORTANCE)}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"unknown reduction {reduction!r}: use 'sum' or 'mean'")
    total: torch.Tensor | None = None
    count = 0
    for dep, idxs in group:
        module = dep.target.module
        if not dg.is_out_channel_pruning_fn(dep.handler):
            continue
        if kind == "l1" and isinstance(module, LAYER_TYPES):
            w = module.weight.detach()
            score = w.abs().flatten(1).sum(dim=1)
        elif kind == "bn" and isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            score = module.weight.detach().abs()
        else:
            continue
        score = score[torch.as_tensor(list(idxs), dtype=torch.long)]
        total = score if total is None else total + score
        count += 1
    if total is None:
        raise ValueError(
            f"importance {kind!r} found no {'BatchNorm' if kind == 'bn' else 'conv/linear'} layer in the group"
        )
    return total / count if reduction == "mean" else total


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
                f"unit {name!r} cannot be shrunk: {_why_not_shrinkable(units[name], groups)}"
            )
    for group in groups:
        ratio = float(ratios.get(group.unit, 1.0))
        keep = kept_channels(group.channels, ratio, min_channels)
        if keep >= group.channels:
            continue
        root = gm.get_submodule(group.owner)
        full = dg.get_pruning_group(root, _out_pruner(dg, root), list(range(group.channels)))
        scores = channel_importance(full, dg, importance)
        drop = scores.argsort()[: group.channels - keep].tolist()
        dg.get_pruning_group(root, _out_pruner(dg, root), sorted(drop)).prune()
    return gm


def _why_not_shrinkable(unit: Any, groups: list[ChannelGroup]) -> str:
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


# --- children and specs ------------------------------------------------------------------


@grad_mode_free
def make_child(
    model: nn.Module,
    spec: dict[str, Any],
    remove: Iterable[str] = (),
    ratios: Mapping[str, float] | None = None,
    min_channels: int = 4,
    importance: str = "l1",
    allow_growth: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Builds a child of ``model`` (the network ``spec`` describes) and the child's spec.

    Args:
        model: the parent network, holding the weights the child inherits.
        spec: the parent's student spec.
        remove: units to remove.
        ratios: keep-ratio per unit to shrink (applied after removal).
        min_channels: no group is shrunk below this many channels.
        importance: ``"l1"`` (filter L1 norm) or ``"bn"`` (BatchNorm gamma).
        allow_growth: ``False`` leaves out the removals that would make the network larger
            (:func:`remove_without_growth`); the child's spec lists the removals made.
    """
    spec = canonical(spec)
    input_shape = spec["base"]["input_shape"]
    remove = list(dict.fromkeys(remove))
    if allow_growth:
        child = remove_units(model, remove, input_shape)
    else:
        child, remove = remove_without_growth(model, remove, input_shape)
    if ratios:
        child = shrink(child, ratios, input_shape, min_channels=min_channels, importance=importance)
    return child, spec_of(child, {**spec, "removed": sorted(set(spec["removed"]) | set(remove))})


@grad_mode_free
def spec_of(model: nn.Module, parent_spec: dict[str, Any]) -> dict[str, Any]:
    """The canonical spec of ``model``, a channel-pruned copy of ``parent_spec``'s network.

    The removed units are the parent's; ``channels`` lists the groups whose width differs
    from the base network's after those removals, read from ``model`` itself.

    Args:
        model: the network to describe; it must have the parent's units (nothing more removed).
        parent_spec: the spec of the network ``model`` was pruned from; its ``channels`` are
            not used.
    """
    spec = canonical(parent_spec)
    child_spec = {
        "format": SPEC_FORMAT,
        "base": spec["base"],
        "removed": spec["removed"],
        "channels": {},
    }
    reference = _unshrunk_channels(json.dumps(canonical(child_spec), sort_keys=True))
    child_spec["channels"] = {
        owner: n
        for owner, n in current_channels(model, spec["base"]["input_shape"]).items()
        if n != reference[owner]
    }
    return canonical(child_spec)


@functools.lru_cache(maxsize=64)
def _unshrunk_channels(spec_json: str) -> dict[str, int]:
    """Group widths of the spec's base network after its removals, before any shrinkage.

    A spec lists only the groups that differ from these, so that equal networks get equal
    specs (and hashes) however they were reached.
    """
    spec = json.loads(spec_json)
    model = remove_units(build_model(spec["base"]), spec["removed"], spec["base"]["input_shape"])
    return current_channels(model, spec["base"]["input_shape"])


@grad_mode_free
def current_channels(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """Output channels of every coupled group, keyed by owner: the spec's ``channels``."""
    gm = trace(model)
    return {
        g.owner: g.channels
        for g in channel_groups(gm, describe(gm, input_shape, count_flops=False))
    }


@grad_mode_free
def apply_spec(base_model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Applies a canonical spec's removals and channel counts to a freshly built base model."""
    if not spec["removed"] and not spec["channels"]:
        return base_model
    input_shape = spec["base"]["input_shape"]
    model = remove_units(base_model, spec["removed"], input_shape)
    if spec["channels"]:
        model = set_channels(model, spec["channels"], input_shape)
    return model


@grad_mode_free
def analyze(model: nn.Module, input_shape: Sequence[int]) -> Architecture:
    """Describes ``model`` (see ``envs.graph.describe``) and marks which units can be shrunk.

    A unit is shrinkable when it decides at least one coupled channel group; the others say
    why not (the classifier's outputs are the classes; a residual block's output width is
    decided by the unit that opens its stage).
    """
    gm = trace(model)
    arch = describe(gm, input_shape)
    groups = channel_groups(gm, arch)
    for unit in arch.units:
        unit.groups = [g.owner for g in groups if g.unit == unit.name]
        unit.shrinkable = bool(unit.groups)
        unit.why_not_shrinkable = None if unit.shrinkable else _why_not_shrinkable(unit, groups)
    return arch
