"""Model surgery that keeps the teacher's weights: remove units, shrink channels, rebuild specs.

Removal rewires the traced graph so that a removed unit's input feeds its users, then erases
the unit. When the unit changed the channel count, the next conv/linear layer is rebuilt
for its new input width, keeping the teacher's weights for the input channels that survive
(the ones it weighted most, by L1 norm); should the input grow instead, the new input
channels get zero weights so the surviving ones compute exactly what they did. Shrinkage
prunes coupled channel groups (``envs.channels``).

Removal can make a network *larger*: a unit that narrows the channels (say 240 -> 80, an
inverted residual's projection) hands its wide input to the next layer, whose new input
weights may outnumber the unit's own. :func:`make_child` therefore leaves such removals out
of the child unless asked otherwise (``allow_growth=True``); see :func:`remove_without_growth`.

The parent is never modified, and every function works whatever the caller's grad mode
(see ``envs.channels.grad_mode_free``).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from envs.builders import build_model
from envs.channels import (
    channel_groups,
    current_channels,
    grad_mode_free,
    set_channels,
    shrink,
    why_not_shrinkable,
)
from envs.costs import count_params
from envs.graph import LAYER_TYPES, Architecture, describe, trace
from envs.spec import SPEC_FORMAT, canonical

log = logging.getLogger(__name__)


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


# --- children and specs ------------------------------------------------------------------


@grad_mode_free
def make_child(
    model: nn.Module,
    spec: dict[str, Any],
    remove: Iterable[str] = (),
    ratios: Mapping[str, float] | None = None,
    min_channels: int = 4,
    importance: str = "l1",
    allow_growth: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Builds a child of ``model`` (the network ``spec`` describes) and the child's spec.

    Args:
        model: the parent network, holding the weights the child inherits.
        spec: the parent's student spec.
        remove: units to remove.
        ratios: keep-ratio per unit to shrink (applied after removal).
        min_channels: no group is shrunk below this many channels.
        importance: ``"l1"`` (filter L1 norm) or ``"bn"`` (BatchNorm gamma).
        allow_growth: ``False`` (the default) leaves out the removals that would make the
            network larger (:func:`remove_without_growth`); the child's spec lists the
            removals made. ``True`` makes every requested removal.
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
        unit.why_not_shrinkable = None if unit.shrinkable else why_not_shrinkable(unit, groups)
    return arch
