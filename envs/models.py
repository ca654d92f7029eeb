"""Teacher zoo: CIFAR-style ResNets, VGG with BatchNorm, a small CNN and a depthwise net.

Every zoo builder takes ``num_classes``, ``in_channels`` and a ``width`` multiplier, so one
architecture serves 8x8 digits on a laptop and full-width CIFAR-10 on a GPU. ResNets reuse
torchvision's ``BasicBlock``; nothing downstream (surgery, descriptors) knows these classes:
any ``torch.fx``-traceable module works as a teacher.

A model is described by a JSON-able *architecture spec*:
``{"arch": "resnet18", "kwargs": {"num_classes": 10, "in_channels": 3, "width": 0.5}}``.
``arch`` is a zoo name or an import path ``"package.module:callable"`` for a user's own
network (``"torchvision.models:mobilenet_v2"``), so a checkpoint can always be rebuilt from its
spec alone. :func:`fit_arch` completes a spec for a dataset: the builder gets the number of
classes and input channels only where it accepts them, and a network that reads other input
channels (or gives other outputs) has that one layer replaced, recorded under ``"adapt"``
(``{"features.0.0": {"in_channels": 1}}``) so :func:`build_model` rebuilds the same network.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1


def _ch(base: int, width: float) -> int:
    """Scales a channel count by ``width``, never below 4."""
    return max(4, round(base * width))


class CifarResNet(nn.Module):
    """ResNet for small images: 3x3 stem, no max-pool, four stages of basic blocks."""

    def __init__(
        self,
        layers: list[int],
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        widths = [_ch(w, width) for w in (64, 128, 256, 512)]
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[0], layers[0], stride=1)
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_VGG_CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ],
}


class VGG(nn.Module):
    """VGG with BatchNorm for small images; pools only while the feature map is > 1 pixel."""

    def __init__(
        self,
        cfg: list[int | str],
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for v in cfg:
            if v == "M":
                if size > 1:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            out = _ch(int(v), width)
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class SmallCNN(nn.Module):
    """The demo teacher: four 3x3 conv layers and a hidden fully connected layer."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3 = _ch(32, width), _ch(64, width), _ch(128, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c2, 3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.Conv2d(c2, c3, 3, padding=1, bias=False),
            nn.BatchNorm2d(c3),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.hidden = nn.Linear(c3, c3)
        self.act = nn.ReLU()
        self.classifier = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.classifier(self.act(self.hidden(x)))


class DepthwiseSeparableNet(nn.Module):
    """A MobileNet-v1-style network: depthwise 3x3 + pointwise 1x1 pairs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        plan = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1)]
        c = _ch(32, width)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
        ]
        for out, stride in plan:
            out = _ch(out, width)
            layers += [
                nn.Conv2d(c, c, 3, stride=stride, padding=1, groups=c, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.Conv2d(c, out, 1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(),
            ]
            c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def resnet18(**kw: Any) -> CifarResNet:
    return CifarResNet([2, 2, 2, 2], **kw)


def resnet34(**kw: Any) -> CifarResNet:
    return CifarResNet([3, 4, 6, 3], **kw)


def vgg11(
    num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size: int = 32
) -> VGG:
    return VGG(_VGG_CFGS["vgg11"], num_classes, in_channels, width, image_size)


def vgg16(
    num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size: int = 32
) -> VGG:
    return VGG(_VGG_CFGS["vgg16"], num_classes, in_channels, width, image_size)


ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "vgg11": vgg11,
    "vgg16": vgg16,
    "small_cnn": SmallCNN,
    "dwsep": DepthwiseSeparableNet,
}


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
    from envs.graph import LAYER_TYPES, trace  # graph does not import this module

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
