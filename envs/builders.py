"""From an architecture spec to a network: zoo names, users' own builders, and data fitting.

An architecture spec is JSON-able: ``{"arch": "resnet18", "kwargs": {...}}``. ``arch`` is a
zoo name (``envs.models.ZOO``) or an import path ``"package.module:callable"`` for a user's
own network (``"torchvision.models:mobilenet_v2"``), so a checkpoint can always be rebuilt
from its spec alone. :func:`fit_arch` completes a spec for a dataset: the builder gets the
number of classes and input channels only where it accepts them, and a network that reads
other input channels (or gives other outputs) has that one layer replaced, recorded under
``"adapt"`` (``{"features.0.0": {"in_channels": 1}}``) so :func:`build_model` rebuilds the
same network.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from envs.graph import LAYER_TYPES, trace
from envs.models import ZOO
from envs.snapshot import SNAPSHOT, rebuild


def resolve_arch(arch: str) -> Callable[..., nn.Module]:
    """Returns the builder for a zoo name or a ``"module:callable"`` import path."""
    if arch in ZOO:
        return ZOO[arch]
    if ":" not in arch:
        raise ValueError(
            f"unknown architecture {arch!r}: use one of {sorted(ZOO)} "
            "or an import path 'package.module:callable'"
        )
    module_name, _, attr = arch.partition(":")
    try:
        builder = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"cannot import architecture {arch!r} ({err}); make the module importable "
            "on every Ray worker (e.g. ray job submit --working-dir)"
        ) from err
    return builder


def build_model(arch_spec: dict[str, Any]) -> nn.Module:
    """Builds a freshly initialised model from ``{"arch": ..., "kwargs": {...}}``.

    The builder is called with exactly ``kwargs``; the layers named under ``"adapt"`` are then
    resized (see :func:`fit_arch`).

    Raises:
        ValueError: an unknown architecture, or kwargs the builder rejects (naming the key).
    """
    if not isinstance(arch_spec, dict) or "arch" not in arch_spec:
        raise ValueError(f"architecture spec {arch_spec!r} needs an 'arch' key")
    arch = arch_spec["arch"]
    if arch == SNAPSHOT:  # a model without a builder, described by envs.snapshot
        return rebuild(arch_spec["snapshot"])
    model = _call(arch, resolve_arch(arch), dict(arch_spec.get("kwargs") or {}))
    for path, sizes in (arch_spec.get("adapt") or {}).items():
        _set_layer(model, path, _resized(model.get_submodule(path), **sizes))
    return model


_REFUSED = re.compile(
    r"(?:unexpected keyword argument|multiple values for (?:keyword )?argument) '(\w+)'"
)


def _refused_key(err: TypeError, kwargs: Mapping[str, Any]) -> str | None:
    """The keyword argument a builder's ``TypeError`` complains about, if it is one we passed."""
    match = _REFUSED.search(str(err))
    return match.group(1) if match and match.group(1) in kwargs else None


def _call(arch: str, builder: Callable[..., nn.Module], kwargs: dict[str, Any]) -> nn.Module:
    try:
        return builder(**kwargs)
    except TypeError as err:
        raise _rejection(arch, builder, kwargs, err) from err


def _rejection(
    arch: str, builder: Callable[..., Any], kwargs: Mapping[str, Any], err: TypeError
) -> ValueError:
    """The one-sentence error for a builder call that raised ``err``."""
    key = _refused_key(err, kwargs)
    if key is not None:
        return ValueError(
            f"architecture {arch!r} rejects keyword argument {key!r} ({err}); drop it or use "
            f"one of the builder's arguments {_signature(builder)}"
        )
    return ValueError(f"architecture {arch!r} rejects kwargs {dict(kwargs)}: {err}")


def _signature(builder: Callable[..., Any]) -> str:
    """The builder's argument names, e.g. ``(weights, progress, **kwargs)``."""
    params = _parameters(builder)
    if params is None:
        return "(unknown)"
    stars = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return "(" + ", ".join(stars.get(p.kind, "") + p.name for p in params.values()) + ")"


def fit_arch(
    arch: str,
    kwargs: Mapping[str, Any],
    input_shape: Sequence[int],
    num_classes: int,
    optional: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The architecture spec of ``arch`` for inputs of ``input_shape`` and ``num_classes`` classes.

    ``kwargs`` are passed as given: a key the builder rejects is an error. ``num_classes``,
    ``in_channels``, ``image_size`` (the input height) and the ``optional`` kwargs are passed
    only where the builder accepts them: where its signature names them, or, for a builder
    that forwards ``**kwargs`` (torchvision's do), where calling it does not refuse them.
    A network built without ``in_channels`` whose input layer reads other channels than the
    data has gets that conv replaced by one of the right width (its filters summed over the
    input channels and spread evenly, as timm adapts pretrained stems), and likewise a
    classifier with other outputs than ``num_classes`` gets a fresh one; both are recorded
    under ``"adapt"``, so :func:`build_model` rebuilds the identical network.

    Returns:
        ``{"arch", "kwargs", "input_shape"}`` plus ``"adapt"`` when a layer was replaced.

    Raises:
        ValueError: an unknown architecture, an explicit kwarg the builder rejects, or a network
            that cannot be adapted to the data or does not produce ``num_classes`` outputs.
    """
    shape = [int(d) for d in input_shape]
    builder = resolve_arch(arch)
    explicit = dict(kwargs)
    offered = {
        "num_classes": int(num_classes),
        "in_channels": shape[0],
        "image_size": shape[1],
        **(optional or {}),
    }
    offered = {k: v for k, v in offered.items() if k not in explicit}
    params = _parameters(builder)
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        offered = {k: v for k, v in offered.items() if k in params and _by_keyword(params[k])}
        model = _call(arch, builder, {**explicit, **offered})
    else:
        while True:
            try:
                model = builder(**explicit, **offered)
                break
            except TypeError as err:
                key = _refused_key(err, offered)
                if key is None:  # an explicit kwarg or something else: the user's to fix
                    raise _rejection(arch, builder, {**explicit, **offered}, err) from err
                del offered[key]
    base: dict[str, Any] = {"arch": arch, "kwargs": {**explicit, **offered}, "input_shape": shape}
    adapt: dict[str, dict[str, int]] = {}
    if "in_channels" not in base["kwargs"]:
        layer = _end_layer(model, arch, "input")
        if _width(model.get_submodule(layer), "in") != shape[0]:
            adapt[layer] = {"in_channels": shape[0]}
    if "num_classes" not in base["kwargs"]:
        layer = _end_layer(model, arch, "output")
        if _width(model.get_submodule(layer), "out") != num_classes:
            adapt[layer] = {**adapt.get(layer, {}), "out_channels": int(num_classes)}
    if adapt:
        base["adapt"] = adapt
        for path, sizes in adapt.items():
            _set_layer(model, path, _resized(model.get_submodule(path), **sizes))
    _check_output(model, base, num_classes)
    return base


def _parameters(builder: Callable[..., Any]) -> Mapping[str, inspect.Parameter] | None:
    try:
        return inspect.signature(builder).parameters
    except (TypeError, ValueError):  # some builtins and C extensions have no signature
        return None


def _by_keyword(param: inspect.Parameter) -> bool:
    return param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


def _end_layer(model: nn.Module, arch: str, end: str) -> str:
    """Module path of the single conv/linear layer reading the input (``end="input"``) or
    producing the output (``"output"``) of the traced network."""
    gm = trace(model)
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    start = [n for n in nodes if n.op == ("placeholder" if end == "input" else "output")]
    found: list[str] = []
    frontier, seen = list(start), set()
    while frontier:
        n = frontier.pop(0)
        if n.name in seen:
            continue
        seen.add(n.name)
        if n not in start and n.op == "call_module" and isinstance(modules[n.target], LAYER_TYPES):
            found.append(n.target)
            continue
        frontier += list(n.users) if end == "input" else n.all_input_nodes
    found = list(dict.fromkeys(found))
    layer = modules[found[0]] if len(found) == 1 else None
    if layer is None or getattr(layer, "groups", 1) != 1:
        what = "input channels" if end == "input" else "classes"
        raise ValueError(
            f"architecture {arch!r} takes no {'in_channels' if end == 'input' else 'num_classes'} "
            f"argument and its {end} is not one plain conv/linear layer ({found}) whose "
            f"{what} could be adapted; give the builder that argument"
        )
    return found[0]


def _width(layer: nn.Module, side: str) -> int:
    if isinstance(layer, nn.Linear):
        return layer.in_features if side == "in" else layer.out_features
    return layer.in_channels if side == "in" else layer.out_channels


@torch.no_grad()
def _resized(
    layer: nn.Module, in_channels: int | None = None, out_channels: int | None = None
) -> nn.Module:
    """A copy of a conv/linear layer reading ``in_channels`` and/or giving ``out_channels``.

    New inputs: the filters summed over the old input channels, spread evenly over the new
    ones, so that an input replicated over the channels gives the same response. New outputs:
    a freshly initialised layer (it is the classifier).
    """
    n_in = _width(layer, "in") if in_channels is None else int(in_channels)
    n_out = _width(layer, "out") if out_channels is None else int(out_channels)
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        new = nn.Linear(n_in, n_out, bias=bias)
    else:
        new = type(layer)(
            n_in, n_out, layer.kernel_size, stride=layer.stride, padding=layer.padding,
            dilation=layer.dilation, groups=layer.groups, bias=bias, padding_mode=layer.padding_mode,
        )  # fmt: skip
    if n_out == _width(layer, "out"):
        w = layer.weight
        new.weight.copy_(w.sum(dim=1, keepdim=True).expand_as(new.weight) / n_in)
        if bias:
            new.bias.copy_(layer.bias)
    return new.to(layer.weight.device, layer.weight.dtype)


def _set_layer(root: nn.Module, path: str, layer: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, layer)


def _check_output(model: nn.Module, base: dict[str, Any], num_classes: int) -> None:
    """Runs one batch through the fitted network; it must give ``num_classes`` outputs."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *base["input_shape"]))
    except Exception as err:
        raise ValueError(
            f"architecture {base['arch']!r} with kwargs {base['kwargs']} fails on inputs of shape "
            f"{base['input_shape']}: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        ) from err
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"architecture {base['arch']!r} with kwargs {base['kwargs']} gives outputs of shape "
            f"{shape} for 2 inputs, not (2, {num_classes}); return the logits as one tensor"
        )
