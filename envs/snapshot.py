"""A network without an importable builder, described as JSON: its ``torch.nn`` layers and the
forward code ``torch.fx`` traced from it.

A model built in a notebook (``torchvision.models.resnet18(num_classes=10)``, a class defined
in ``__main__``) has no ``package.module:callable`` a checkpoint could name. :func:`snapshot`
describes it instead: every leaf layer by its ``torch.nn`` class and constructor arguments
(read back from the layer and checked by rebuilding it), the containers by their place in the
tree, and the forward pass as the Python source ``torch.fx`` generates for the traced graph.
:func:`rebuild` makes an equal network from that description alone (weights are loaded after,
as for every spec), so a student of such a teacher reloads from its run directory alone.
Nothing is pickled; the forward source is run with only the names ``torch.fx`` gives it.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn

from envs.graph import trace

SNAPSHOT = "fx-snapshot"
"""The ``arch`` of an architecture spec holding a snapshot (under ``"snapshot"``)."""
_SKIPPED = {"self", "device", "dtype"}


def snapshot(model: nn.Module) -> dict[str, Any]:
    """The JSON description of ``model``: ``{"modules": tree, "code": forward source}``.

    Raises:
        ValueError: the model cannot be traced, holds a layer that is not ``torch.nn``'s or
            parameters outside layers, or its forward calls something ``torch.fx`` cannot name.
    """
    gm = trace(model)
    python = gm.graph.python_code(root_module="self")
    names = {}  # what else the generated forward names: torch's own objects only
    for key, value in python.globals.items():
        if key in _forward_globals():
            continue
        if isinstance(value, str):  # an annotation kept as text (from __future__ annotations)
            names[key] = {"text": value}
            continue
        module = getattr(value, "__module__", None) or ""
        qualname = getattr(value, "__qualname__", None)
        if not (module == "torch" or module.startswith("torch.")) or qualname is None:
            raise ValueError(
                f"the forward of {type(model).__name__} calls {key} ({value!r}), which a "
                "snapshot cannot name; give a builder 'package.module:callable' instead "
                "(teacher.arch)"
            )
        names[key] = {"import": f"{module}:{qualname}"}
    return {"modules": _describe(gm, "", type(model).__name__), "code": python.src,
            "names": names}  # fmt: skip


def rebuild(description: dict[str, Any]) -> nn.Module:
    """A freshly initialised network from :func:`snapshot`'s description."""
    namespace = dict(_forward_globals())
    for key, name in description.get("names", {}).items():
        if "text" in name:
            namespace[key] = str(name["text"])
            continue
        path = name["import"]
        module, _, qualname = path.partition(":")
        if not (module == "torch" or module.startswith("torch.")):
            raise ValueError(f"snapshot name {key} = {path!r} is not one of torch's")
        value = importlib.import_module(module)
        for part in qualname.split("."):
            value = getattr(value, part)
        namespace[key] = value
    exec(compile(description["code"], "<n2n snapshot>", "exec"), namespace)  # noqa: S102
    cls = type("Snapshot", (nn.Module,), {"forward": namespace["forward"]})
    root = cls()
    _fill(root, description["modules"])
    return root


def _forward_globals() -> dict[str, Any]:
    """The names ``torch.fx`` puts in a generated forward's globals, made afresh."""
    return torch.fx.Graph().python_code(root_module="self").globals


def _describe(module: nn.Module, path: str, name: str) -> dict[str, Any]:
    children = dict(module.named_children())
    if not children:
        return _leaf(module, path or name)
    own = [n for n, _ in module.named_parameters(recurse=False)]
    own += [n for n, _ in module.named_buffers(recurse=False)]
    if own:
        raise ValueError(
            f"module {path or name} holds {own} outside its layers, which a snapshot cannot "
            "describe; give a builder 'package.module:callable' instead (teacher.arch)"
        )
    return {
        "children": {
            key: _describe(child, f"{path}.{key}" if path else key, name)
            for key, child in children.items()
        }
    }


def _leaf(layer: nn.Module, path: str) -> dict[str, Any]:
    cls = type(layer)
    if not cls.__module__.startswith("torch.nn."):
        raise ValueError(
            f"layer {path} is a {cls.__module__}.{cls.__name__}, not a torch.nn layer a snapshot "
            "can describe; give a builder 'package.module:callable' instead (teacher.arch)"
        )
    kwargs: dict[str, Any] = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name in _SKIPPED or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if not hasattr(layer, name):
            raise ValueError(
                f"layer {path} ({cls.__name__}) has no attribute for argument {name!r}"
            )
        value = getattr(layer, name)
        if isinstance(param.default, bool) and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None  # bias=True is stored as a Parameter, bias=False as None
        kwargs[name] = list(value) if isinstance(value, tuple) else value
    spec = {"class": f"{cls.__module__}:{cls.__qualname__}", "kwargs": kwargs}
    if repr(_layer(spec)) != repr(layer):
        raise ValueError(f"layer {path} ({cls.__name__}) cannot be rebuilt from its arguments")
    return spec


def _layer(spec: dict[str, Any]) -> nn.Module:
    module, _, name = spec["class"].partition(":")
    if not module.startswith("torch.nn."):
        raise ValueError(f"snapshot layer class {spec['class']!r} is not a torch.nn layer")
    cls = getattr(importlib.import_module(module), name)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["kwargs"].items()}
    return cls(**kwargs)


def _fill(parent: nn.Module, tree: dict[str, Any]) -> None:
    for key, child in tree["children"].items():
        if "children" in child:
            holder = nn.Module()
            _fill(holder, child)
            parent.add_module(key, holder)
        else:
            parent.add_module(key, _layer(child))
