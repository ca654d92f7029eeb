"""Describe any ``torch.fx``-traceable CNN as an ordered list of units.

A *unit* is what the N2N policies act on: a residual block (a submodule whose traced
region has one input, one output and ends in its only addition), or a single conv / linear
layer together with the BatchNorm, activation and dropout that directly follow it. Nothing
here knows a particular architecture: blocks are found from the traced graph and the module
hierarchy that ``torch.fx`` records in ``node.meta["nn_module_stack"]``.

Each unit is marked removable or not, with the reason, and gets a fixed-length descriptor
(N2N's layer type, kernel, stride, padding, channels and skip-connection fields, plus its
share of parameters and FLOPs), normalised to [0, 1].

Longer than 400 lines because it is one algorithm over one traced graph: tracing with shapes
and FLOPs, finding blocks, grouping followers and deciding removability share the graph
helpers here, and split apart each part would reach into the others' internals.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

FEATURES = (
    "is_conv",
    "is_linear",
    "is_block",
    "is_depthwise",
    "kernel",
    "stride",
    "padding",
    "out_channels",
    "in_channels",
    "identity_shortcut",
    "projection_shortcut",
    "param_share",
    "flop_share",
    "position",
    "removable",
    "shrinkable",
    "keep_ratio",
    "cursor",
)
"""Descriptor columns, in order. The envs fill ``keep_ratio`` and ``cursor``."""
COL = {name: i for i, name in enumerate(FEATURES)}
NUM_FEATURES = len(FEATURES)

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_FOLLOWER_MODULES = (
    nn.modules.batchnorm._BatchNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
    nn.Sigmoid, nn.Tanh, nn.ELU, nn.Mish, nn.PReLU,
    nn.Dropout, nn.Dropout2d, nn.Identity,
)  # fmt: skip
_ACTIVATION_FUNCTIONS = {
    torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6, torch.nn.functional.gelu,
    torch.nn.functional.silu, torch.nn.functional.hardswish, torch.sigmoid, torch.tanh,
    torch.nn.functional.dropout,
}  # fmt: skip
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
# Ops a removed channel-changing layer's output may pass through before its consumer adapts.
_CHANNEL_AGNOSTIC_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, *_FOLLOWER_MODULES[1:],
)  # fmt: skip
_CHANNEL_AGNOSTIC_FUNCTIONS = {torch.flatten, torch.nn.functional.adaptive_avg_pool2d,
                               torch.nn.functional.max_pool2d, torch.nn.functional.avg_pool2d,
                               *_ACTIVATION_FUNCTIONS}  # fmt: skip


class TraceError(ValueError):
    """The model cannot be traced by ``torch.fx``; the message names the module."""


@dataclass
class Unit:
    """One removable/shrinkable piece of a network."""

    name: str
    """Module path: ``"layer1.0"`` for a block, ``"features.3"`` for a layer."""
    kind: str
    """``"block"``, ``"conv"`` or ``"linear"``."""
    nodes: list[str]
    """fx node names that belong to the unit, in topological order."""
    modules: list[str]
    """Module paths called by the unit."""
    input_node: str
    output_node: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    depthwise: bool = False
    identity_shortcut: bool = False
    projection_shortcut: bool = False
    params: int = 0
    flops: int = 0
    removable: bool = False
    why_not: str | None = None
    """Why the unit is not removable (``None`` when it is)."""
    shrinkable: bool = False
    why_not_shrinkable: str | None = None
    groups: list[str] = field(default_factory=list)
    """Coupled channel groups this unit decides, by their first layer (set by surgery)."""

    @property
    def in_channels(self) -> int:
        return int(self.in_shape[1]) if len(self.in_shape) > 1 else 0

    @property
    def out_channels(self) -> int:
        return int(self.out_shape[1]) if len(self.out_shape) > 1 else 0


@dataclass
class Architecture:
    """A traced network: its graph, shapes, and units in topological order."""

    graph_module: fx.GraphModule
    input_shape: tuple[int, ...]
    units: list[Unit]
    shapes: dict[str, tuple[int, ...]]
    params: int
    flops: int

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(name)

    @property
    def removable(self) -> list[Unit]:
        return [u for u in self.units if u.removable]

    @property
    def shrinkable(self) -> list[Unit]:
        return [u for u in self.units if u.shrinkable]

    def descriptors(self) -> np.ndarray:
        """Unit descriptors as float32 ``[units, NUM_FEATURES]`` in [0, 1]."""
        n = len(self.units)
        out = np.zeros((n, NUM_FEATURES), dtype=np.float32)
        max_ch = max([max(u.in_channels, u.out_channels) for u in self.units] + [1])
        for i, u in enumerate(self.units):
            row = out[i]
            row[COL["is_conv"]] = u.kind == "conv"
            row[COL["is_linear"]] = u.kind == "linear"
            row[COL["is_block"]] = u.kind == "block"
            row[COL["is_depthwise"]] = u.depthwise
            row[COL["kernel"]] = min(u.kernel, 7) / 7
            row[COL["stride"]] = min(u.stride, 4) / 4
            row[COL["padding"]] = min(u.padding, 3) / 3
            row[COL["out_channels"]] = u.out_channels / max_ch
            row[COL["in_channels"]] = u.in_channels / max_ch
            row[COL["identity_shortcut"]] = u.identity_shortcut
            row[COL["projection_shortcut"]] = u.projection_shortcut
            row[COL["param_share"]] = u.params / max(self.params, 1)
            row[COL["flop_share"]] = u.flops / max(self.flops, 1)
            row[COL["position"]] = i / max(n - 1, 1)
            row[COL["removable"]] = u.removable
            row[COL["shrinkable"]] = u.shrinkable
            row[COL["keep_ratio"]] = 1.0
        return out

    def summary(self) -> list[dict[str, Any]]:
        """One row per unit, for tables and logs."""
        return [
            {
                "unit": u.name,
                "kind": u.kind,
                "in": u.in_channels,
                "out": u.out_channels,
                "stride": u.stride,
                "params": u.params,
                "flops": u.flops,
                "removable": u.removable,
                "why_not": u.why_not or "",
                "shrinkable": u.shrinkable,
            }
            for u in self.units
        ]


class _Tracer(fx.Tracer):
    """A tracer that remembers which module it was inside when tracing failed."""

    def __init__(self) -> None:
        super().__init__()
        self.path: list[str] = []
        self.failed_in: str | None = None

    def call_module(self, m, forward, args, kwargs):  # noqa: ANN001 (fx signature)
        self.path.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path[-1]
            raise
        finally:
            self.path.pop()


# torch.fx patches functions through one process-wide patcher (``CURRENT_PATCHER``) and
# tracing writes to the traced module, so two traces at once in one process corrupt each other
# (random search once played its envs in threads; a user's code may too). One at a time.
_TRACE_LOCK = threading.Lock()


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically traces ``model``; raises :class:`TraceError` naming the failing module.

    Safe to call from several threads: traces take turns.
    """
    if isinstance(model, fx.GraphModule):
        return model
    tracer = _Tracer()
    try:
        with _TRACE_LOCK:
            graph = tracer.trace(model)
            return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as err:
        where = tracer.failed_in or type(model).__name__
        raise TraceError(
            f"torch.fx cannot trace the teacher: module {where!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}); make its forward free of data-dependent "
            "control flow or wrap it with torch.fx.wrap"
        ) from err


class _ShapeFlopProp(fx.Interpreter):
    """Runs the graph once, recording every node's output shape and FLOPs."""

    def __init__(self, gm: fx.GraphModule, count_flops: bool = True) -> None:
        super().__init__(gm)
        self.count_flops = count_flops
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.flops: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        if not self.count_flops:
            result = super().run_node(n)
        else:
            with FlopCounterMode(display=False) as counter:
                result = super().run_node(n)
            self.flops[n.name] = int(counter.get_total_flops())
        if isinstance(result, torch.Tensor):
            self.shapes[n.name] = tuple(result.shape)
        return result


def _module_stack(node: fx.Node) -> list[str]:
    return [p.split("@")[0] for p in node.meta.get("nn_module_stack", {})]


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )


def _is_follower(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _FOLLOWER_MODULES)
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_", "sigmoid", "tanh")


def is_channel_agnostic(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """True for ops that work on any number of channels (pooling, activations, flatten)."""
    if node.op == "call_module":
        return isinstance(modules[node.target], _CHANNEL_AGNOSTIC_MODULES)
    if node.op == "call_function":
        return node.target in _CHANNEL_AGNOSTIC_FUNCTIONS
    return node.op == "call_method" and node.target in ("flatten", "view", "relu", "mean")


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if a.op != "get_attr"]


def describe(
    model: nn.Module, input_shape: Sequence[int], count_flops: bool = True
) -> Architecture:
    """Traces ``model`` and splits it into units (see module docstring).

    ``count_flops=False`` skips the per-unit FLOP counts (then zero), which surgery does not need.

    Raises:
        TraceError: ``torch.fx`` cannot trace the model.
    """
    gm = trace(model)
    modules = dict(gm.named_modules())
    prop = _ShapeFlopProp(gm, count_flops)
    was_training = [m.training for m in gm.modules()]
    gm.eval()
    try:
        with torch.no_grad():
            prop.run(torch.zeros(1, *input_shape))
    finally:
        for m, t in zip(gm.modules(), was_training, strict=True):
            m.training = t
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    by_name = {n.name: n for n in gm.graph.nodes}
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    output = next(n for n in gm.graph.nodes if n.op == "output")

    blocks = _find_blocks(nodes, modules)
    claimed = {name for b in blocks.values() for name in b[0]}
    units: list[Unit] = []
    current: Unit | None = None
    for n in nodes:
        block = next((path for path, (names, _, _) in blocks.items() if n.name in names), None)
        if block is not None:
            names, in_node, out_node = blocks[block]
            if not units or units[-1].name != block:
                units.append(_block_unit(block, names, in_node, out_node, gm, modules, prop))
            current = None
            continue
        if n.name in claimed:
            continue
        if n.op == "call_module" and isinstance(modules[n.target], LAYER_TYPES):
            current = _layer_unit(n, modules, prop)
            units.append(current)
            continue
        prev = by_name[current.output_node] if current is not None else None
        if (
            prev is not None
            and _is_follower(n, modules)
            and _tensor_inputs(n) == [prev]
            and len(prev.users) == 1
        ):
            current.nodes.append(n.name)
            current.output_node = n.name
            current.flops += prop.flops.get(n.name, 0)
            if n.op == "call_module":
                current.modules.append(n.target)
                current.params += sum(p.numel() for p in modules[n.target].parameters())
            continue
        current = None

    total_params = sum(p.numel() for p in gm.parameters())
    total_flops = sum(prop.flops.values())
    arch = Architecture(gm, tuple(input_shape), units, prop.shapes, total_params, total_flops)
    for u in units:
        u.out_shape = prop.shapes[u.output_node]
        u.removable, u.why_not = _removability(u, arch, gm, modules, placeholder, output)
    return arch


def _find_blocks(
    nodes: list[fx.Node], modules: dict[str, nn.Module]
) -> dict[str, tuple[set[str], fx.Node, fx.Node]]:
    """Residual blocks: module regions with one input, one output and a single final add."""
    regions: dict[str, list[fx.Node]] = {}
    for n in nodes:
        for path in _module_stack(n):
            regions.setdefault(path, []).append(n)
    blocks: dict[str, tuple[set[str], fx.Node, fx.Node]] = {}
    # Innermost first, so a wrapper around one block never stands for the block.
    for path in sorted(regions, key=lambda p: -p.count(".")):
        if (
            path == ""
            or path in modules
            and isinstance(modules[path], LAYER_TYPES + _FOLLOWER_MODULES)
        ):
            continue
        if any(b.startswith(path + ".") or path.startswith(b + ".") for b in blocks):
            continue
        region = regions[path]
        names = {n.name for n in region}
        inputs = {a for n in region for a in _tensor_inputs(n) if a.name not in names}
        outputs = [n for n in region if any(u.name not in names for u in n.users)]
        adds = [n for n in region if _is_add(n)]
        if len(inputs) != 1 or len(outputs) != 1 or len(adds) != 1:
            continue
        out, add = outputs[0], adds[0]
        tail = out
        while tail is not add and len(_tensor_inputs(tail)) == 1 and _is_follower(tail, modules):
            tail = _tensor_inputs(tail)[0]
        if tail is not add:
            continue
        if not any(
            n.op == "call_module" and isinstance(modules[n.target], LAYER_TYPES) for n in region
        ):
            continue
        blocks[path] = (names, next(iter(inputs)), out)
    return blocks


def _block_unit(
    path: str,
    names: set[str],
    in_node: fx.Node,
    out_node: fx.Node,
    gm: fx.GraphModule,
    modules: dict[str, nn.Module],
    prop: _ShapeFlopProp,
) -> Unit:
    region = [n for n in gm.graph.nodes if n.name in names]
    layers = [
        modules[n.target]
        for n in region
        if n.op == "call_module" and isinstance(modules[n.target], LAYER_TYPES)
    ]
    add = next(n for n in region if _is_add(n))
    identity = in_node in add.all_input_nodes
    in_shape, out_shape = prop.shapes[in_node.name], prop.shapes[out_node.name]
    convs = [m for m in layers if isinstance(m, nn.Conv2d | nn.Conv1d | nn.Conv3d)]
    stride = max((m.stride[0] for m in convs), default=1)
    called = sorted({n.target for n in region if n.op == "call_module"})
    return Unit(
        name=path,
        kind="block",
        nodes=[n.name for n in region],
        modules=called,
        input_node=in_node.name,
        output_node=out_node.name,
        in_shape=in_shape,
        out_shape=out_shape,
        kernel=max((m.kernel_size[0] for m in convs), default=1),
        stride=stride,
        padding=max(
            (m.padding[0] if isinstance(m.padding, tuple) else 0 for m in convs), default=0
        ),
        identity_shortcut=identity,
        projection_shortcut=not identity,
        params=sum(p.numel() for name in called for p in modules[name].parameters()),
        flops=sum(prop.flops.get(n.name, 0) for n in region),
    )


def _layer_unit(n: fx.Node, modules: dict[str, nn.Module], prop: _ShapeFlopProp) -> Unit:
    m = modules[n.target]
    (src,) = _tensor_inputs(n)[:1] or [n]
    unit = Unit(
        name=n.target,
        kind="linear" if isinstance(m, nn.Linear) else "conv",
        nodes=[n.name],
        modules=[n.target],
        input_node=src.name,
        output_node=n.name,
        in_shape=prop.shapes[src.name],
        out_shape=prop.shapes[n.name],
        params=sum(p.numel() for p in m.parameters()),
        flops=prop.flops.get(n.name, 0),
    )
    if not isinstance(m, nn.Linear):
        unit.kernel, unit.stride = m.kernel_size[0], m.stride[0]
        unit.padding = m.padding[0] if isinstance(m.padding, tuple) else 0
        unit.depthwise = m.groups > 1 and m.groups == m.in_channels
    return unit


def consumer_path(
    start: fx.Node, modules: dict[str, nn.Module]
) -> tuple[list[fx.Node], fx.Node | None]:
    """Follows a single-user chain of channel-agnostic ops from ``start`` to the next layer.

    Returns the ops passed and the consuming conv/linear node, or ``None`` when the chain
    forks, merges or reaches anything else.
    """
    passed: list[fx.Node] = []
    n = start
    while len(n.users) == 1:
        (user,) = n.users
        if _tensor_inputs(user) != [n]:
            return passed, None
        if user.op == "call_module" and isinstance(modules[user.target], LAYER_TYPES):
            return passed, user
        if not is_channel_agnostic(user, modules):
            return passed, None
        passed.append(user)
        n = user
    return passed, None


def _removability(
    u: Unit,
    arch: Architecture,
    gm: fx.GraphModule,
    modules: dict[str, nn.Module],
    placeholder: fx.Node,
    output: fx.Node,
) -> tuple[bool, str | None]:
    """Whether replacing ``u`` by its input keeps the network valid, and if not, why."""
    out_node = next(n for n in gm.graph.nodes if n.name == u.output_node)
    if u.input_node == placeholder.name:
        return False, "stem: reads the network input"
    if _reaches_output(out_node, modules, output):
        return False, "classifier: produces the network output"
    if u.kind == "block":
        if not u.identity_shortcut:
            return False, "projection shortcut: the block changes shape (down-sampling)"
        if u.in_shape != u.out_shape:
            return False, "the block changes shape"
        return True, None
    if u.in_shape[2:] != u.out_shape[2:]:
        return False, f"down-sampling: stride {u.stride} changes the feature map size"
    if u.in_channels == u.out_channels:
        return True, None
    passed, consumer = consumer_path(out_node, modules)
    if consumer is None:
        return False, "changes the channel count and its output does not feed one conv/linear layer"
    cmod = modules[consumer.target]
    if isinstance(cmod, nn.Conv1d | nn.Conv2d | nn.Conv3d) and cmod.groups != 1:
        return False, "changes the channel count and feeds a grouped convolution"
    if isinstance(cmod, nn.Linear):
        flat = arch.shapes[passed[-1].name] if passed else u.out_shape
        if len(flat) != 2 or flat[1] != u.out_channels:
            return (
                False,
                "changes the channel count and feeds a linear layer through a spatial flatten",
            )
    return True, None


def _reaches_output(node: fx.Node, modules: dict[str, nn.Module], output: fx.Node) -> bool:
    """True if ``node`` flows to the graph output through no other conv/linear layer."""
    frontier, seen = [node], set()
    while frontier:
        n = frontier.pop()
        if n is output:
            return True
        if n.name in seen:
            continue
        seen.add(n.name)
        frontier += [
            u
            for u in n.users
            if not (u.op == "call_module" and isinstance(modules[u.target], LAYER_TYPES))
        ]
    return False
