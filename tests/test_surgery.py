"""Surgery must be exact: identity when nothing changes, closed-form parameter counts,
valid networks for any legal action, on the zoo and on a user's own network."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from envs.builders import build_model
from envs.channels import (
    channel_groups,
    channel_importance,
    dependency_graph,
    pruning_group,
    shrink,
)
from envs.checkpoint import build_from_spec
from envs.costs import count_flops, count_params
from envs.graph import TraceError, describe, trace
from envs.spec import arch_hash, base_spec, teacher_spec
from envs.surgery import analyze, make_child, remove_units, remove_without_growth

ZOO = [
    ("resnet18", [3, 16, 16], {"width": 0.25}),
    ("resnet34", [3, 16, 16], {"width": 0.125}),
    ("vgg11", [3, 32, 32], {"width": 0.125}),
    ("vgg16", [3, 32, 32], {"width": 0.125}),
    ("small_cnn", [1, 8, 8], {}),
    ("dwsep", [3, 16, 16], {"width": 0.25}),
]


class InvertedResidual(nn.Module):
    """A user's MobileNet-v2 block: expand 1x1, depthwise 3x3, project 1x1, identity add."""

    def __init__(self, c: int, expand: int = 4) -> None:
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.dw = nn.Sequential(
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6()
        )
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.dw(self.expand(x)))


class UserDepthwiseNet(nn.Module):
    """Not in the zoo: depthwise-separable convs, inverted residuals, a functional relu."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.block1 = InvertedResidual(24)
        self.block2 = InvertedResidual(24)
        self.down = nn.Conv2d(24, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.pw(torch.relu(self.dw(x))))
        x = self.down(self.block2(self.block1(x)))
        return self.head(x.mean(dim=(2, 3)))


def _user_spec() -> dict:
    return teacher_spec(base_spec(f"{__name__}:UserDepthwiseNet", [3, 16, 16]))


def _model(arch: str, shape: list[int], kwargs: dict) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    spec = teacher_spec(base_spec(arch, shape, **kwargs))
    model = build_model(spec["base"]).eval()
    _randomise_bn(model)
    return model, spec


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so identity tests exercise every tensor."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.1, 0.1)


ALL = [pytest.param(a, s, k, id=a) for a, s, k in ZOO] + [
    pytest.param(f"{__name__}:UserDepthwiseNet", [3, 16, 16], {}, id="user-depthwise")
]


@pytest.mark.parametrize(("arch", "shape", "kwargs"), ALL)
def test_keep_everything_is_exactly_the_teacher(arch, shape, kwargs):
    teacher, spec = _model(arch, shape, kwargs)
    x = torch.randn(4, *shape)
    expected = teacher(x)
    kept, kept_spec = make_child(teacher, spec)
    ratios = {u.name: 1.0 for u in analyze(teacher, shape).shrinkable}
    full, full_spec = make_child(teacher, spec, ratios=ratios)
    assert torch.equal(kept.eval()(x), expected)
    assert torch.equal(full.eval()(x), expected)
    assert arch_hash(kept_spec) == arch_hash(full_spec) == arch_hash(spec)
    assert torch.equal(teacher(x), expected), "surgery modified the teacher"


@pytest.mark.parametrize(("arch", "shape", "kwargs"), ALL)
def test_random_actions_give_valid_smaller_networks(arch, shape, kwargs):
    teacher, spec = _model(arch, shape, kwargs)
    arch_info = analyze(teacher, shape)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    rng = random.Random(0)
    x = torch.randn(2, *shape)
    for _ in range(3):
        remove = [u.name for u in arch_info.removable if rng.random() < 0.5]
        child, child_spec = make_child(teacher, spec, remove=remove)
        ratios = {
            u.name: rng.choice([0.1, 0.3, 0.5, 0.8, 1.0]) for u in analyze(child, shape).shrinkable
        }
        student, student_spec = make_child(child, child_spec, ratios=ratios)
        out = student.eval()(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        assert count_params(student) <= count_params(child) <= count_params(teacher)
        # The spec alone rebuilds the same shapes; the state_dict the same function.
        rebuilt = build_from_spec(student_spec)
        rebuilt.load_state_dict(student.state_dict())
        assert torch.equal(rebuilt.eval()(x), out)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher tensor {k} changed"


def test_removing_a_basic_block_removes_two_convs_and_two_batchnorms():
    teacher, spec = _model("resnet18", [3, 16, 16], {"width": 0.5})
    w = 32  # round(64 * 0.5): the width of stage 1
    child, _ = make_child(teacher, spec, remove=["layer1.1"])
    conv, bn = 3 * 3 * w * w, 2 * w
    assert count_params(teacher) - count_params(child) == 2 * conv + 2 * bn
    child2, _ = make_child(teacher, spec, remove=["layer1.0", "layer1.1"])
    assert count_params(teacher) - count_params(child2) == 4 * conv + 4 * bn


def test_shrinking_one_plain_conv_matches_closed_form():
    teacher, spec = _model("small_cnn", [1, 8, 8], {})
    # features.0 is Conv(1->32) + BN(32); its 32 channels feed features.3, Conv(32->32).
    child, child_spec = make_child(teacher, spec, ratios={"features.0": 0.25})
    kept = 8
    removed = (32 - kept) * (1 * 9) + 2 * (32 - kept) + (32 - kept) * 32 * 9
    assert count_params(teacher) - count_params(child) == removed
    assert child_spec["channels"] == {"features.0": kept}


def test_residual_coupling_shrinks_a_whole_stage_together():
    teacher, spec = _model("resnet18", [3, 16, 16], {"width": 0.25})
    # The stem decides stage 1's residual width: every block's conv2 and BN follow it.
    child, _ = make_child(teacher, spec, ratios={"conv1": 0.5})
    assert child.get_submodule("conv1").out_channels == 8
    for block in ("layer1.0", "layer1.1"):
        assert child.get_submodule(f"{block}.conv1").in_channels == 8
        assert child.get_submodule(f"{block}.conv2").out_channels == 8
        assert child.get_submodule(f"{block}.bn2").num_features == 8
    assert child.get_submodule("layer2.0.downsample.0").in_channels == 8
    assert child.get_submodule("layer1.0.conv1").out_channels == 16  # its own group, untouched


def test_depthwise_groups_follow_their_pointwise_conv():
    teacher, spec = _model("dwsep", [3, 16, 16], {"width": 0.5})
    child, _ = make_child(teacher, spec, ratios={"features.6": 0.5})
    pw, dw = child.get_submodule("features.6"), child.get_submodule("features.9")
    assert pw.out_channels == dw.in_channels == dw.out_channels == dw.groups == 16
    assert child.get_submodule("features.12").in_channels == 16


def _closed_form(teacher: nn.Module, kind: str) -> torch.Tensor:
    """The criterion's score for each output channel of small_cnn's first conv, by hand: its
    group is the conv's filters, its BatchNorm's scales and the next conv's input weights."""
    w0 = teacher.get_submodule("features.0").weight.detach()
    gamma = teacher.get_submodule("features.1").weight.detach()
    w3 = teacher.get_submodule("features.3").weight.detach()
    if kind == "bn":
        return gamma.abs()
    p = {"l1": 1, "l2": 2}[kind]
    parts = [
        w0.abs().pow(p).sum(dim=(1, 2, 3)),
        gamma.abs().pow(p),
        w3.abs().pow(p).sum(dim=(0, 2, 3)),
    ]
    return torch.stack(parts).mean(dim=0)  # Torch-Pruning's group mean over the three layers


@pytest.mark.parametrize("kind", ["l1", "l2", "bn", "fpgm"])
def test_shrinkage_keeps_the_channels_the_criterion_ranks_highest(kind):
    teacher, spec = _model("small_cnn", [1, 8, 8], {})
    torch.manual_seed(1)
    with torch.no_grad():  # scales of different sizes, so that the criteria disagree
        teacher.get_submodule("features.1").weight.uniform_(0.1, 2.0)
    if kind == "fpgm":  # no closed form here: Torch-Pruning's own scorer on the teacher
        dg = dependency_graph(teacher, [1, 8, 8])
        root = teacher.get_submodule("features.0")
        scores = channel_importance(pruning_group(dg, root, range(32)), "fpgm")
    else:
        scores = _closed_form(teacher, kind)
    top = scores.argsort(descending=True)[:8].sort().values
    child, _ = make_child(teacher, spec, ratios={"features.0": 0.25}, importance=kind)
    w = teacher.get_submodule("features.0").weight.detach()
    assert torch.equal(child.get_submodule("features.0").weight, w[top])
    next_w = teacher.get_submodule("features.3").weight.detach()
    assert torch.equal(child.get_submodule("features.3").weight, next_w[:, top])


def test_the_criteria_rank_differently():
    teacher, _ = _model("small_cnn", [1, 8, 8], {})
    torch.manual_seed(1)
    with torch.no_grad():
        teacher.get_submodule("features.1").weight.uniform_(0.1, 2.0)
    tops = {k: set(_closed_form(teacher, k).argsort()[-8:].tolist()) for k in ("l1", "l2", "bn")}
    assert tops["l1"] != tops["bn"] and tops["l2"] != tops["bn"]


def test_min_channels_floor():
    teacher, spec = _model("small_cnn", [1, 8, 8], {})
    child, _ = make_child(teacher, spec, ratios={"features.0": 0.1}, min_channels=6)
    assert child.get_submodule("features.0").out_channels == 6


def test_removing_a_channel_changing_conv_adapts_the_next_layer():
    teacher, spec = _model("vgg11", [3, 32, 32], {"width": 0.25})
    # features.4 is Conv(16->32); the next layer features.8 is Conv(32->64).
    old = teacher.get_submodule("features.8").weight.detach()
    child, _ = make_child(teacher, spec, remove=["features.4"])
    new = child.get_submodule("features.8").weight
    assert new.shape == (64, 16, 3, 3)
    kept = old.abs().sum(dim=(0, 2, 3)).argsort(descending=True)[:16].sort().values
    assert torch.equal(new, old[:, kept])
    assert child.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


class Narrowing(nn.Module):
    """A conv that narrows 32 -> 16 channels before a conv that widens to 64."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 64, 3, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(torch.relu(self.b(torch.relu(self.a(x)))))
        return self.fc(x.mean(dim=(2, 3)))


def test_removing_a_narrowing_conv_zero_pads_the_new_inputs():
    torch.manual_seed(0)
    model = Narrowing().eval()
    child = remove_units(model, ["b"], [3, 8, 8])
    w = child.get_submodule("c").weight
    assert w.shape == (64, 32, 3, 3)
    assert torch.equal(w[:, :16], model.c.weight)
    assert torch.count_nonzero(w[:, 16:]) == 0


def test_units_and_reasons_on_resnet18():
    arch = analyze(build_model({"arch": "resnet18", "kwargs": {"width": 0.25}}), [3, 16, 16])
    names = [u.name for u in arch.units]
    assert names == ["conv1"] + [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)] + ["fc"]
    removable = {u.name for u in arch.removable}
    assert removable == {"layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"}
    reasons = {u.name: u.why_not for u in arch.units}
    assert reasons["conv1"].startswith("stem")
    assert reasons["layer2.0"].startswith("projection shortcut")
    assert reasons["fc"].startswith("classifier")
    assert not arch.unit("fc").shrinkable
    assert arch.unit("layer2.0").groups == ["layer2.0.conv1", "layer2.0.conv2"]
    desc = arch.descriptors()
    assert desc.shape == (10, 18) and desc.dtype.name == "float32"
    assert desc.min() >= 0.0 and desc.max() <= 1.0
    assert abs(desc[:, 11].sum() - 1.0) < 0.01  # parameter shares add up to the whole network


def test_flops_come_from_torch_counter_and_match_closed_form():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False))
    assert count_flops(conv, [3, 10, 10]) == 2 * 3 * 8 * 9 * 10 * 10


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.conv(x))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return x
        return -x


def test_untraceable_teacher_names_the_module():
    with pytest.raises(TraceError, match="module 'gate'"):
        describe(Untraceable(), [1, 8, 8])


def test_bad_surgery_requests_fail_clearly():
    teacher, spec = _model("resnet18", [3, 16, 16], {"width": 0.25})
    with pytest.raises(ValueError, match=r"'layer2.0' cannot be removed: projection shortcut"):
        make_child(teacher, spec, remove=["layer2.0"])
    with pytest.raises(ValueError, match=r"unit 'nope' does not exist"):
        make_child(teacher, spec, remove=["nope"])
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
            shrink(teacher, {"conv1": bad}, [3, 16, 16])
    with pytest.raises(ValueError, match="cannot be shrunk: its outputs are the classes"):
        shrink(teacher, {"fc": 0.5}, [3, 16, 16])


@pytest.mark.parametrize(
    "mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"]
)
@pytest.mark.parametrize(
    ("arch", "shape", "kwargs"),
    [
        pytest.param("resnet18", [3, 16, 16], {"width": 0.25}, id="resnet18"),
        pytest.param(f"{__name__}:UserDepthwiseNet", [3, 16, 16], {}, id="user-depthwise"),
    ],
)
def test_surgery_ignores_the_callers_grad_mode(mode, arch, shape, kwargs):
    teacher, spec = _model(arch, shape, kwargs)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    remove = [u.name for u in analyze(teacher, shape).removable][:2]
    x = torch.randn(2, *shape)

    def children():
        removed, removed_spec = make_child(teacher, spec, remove=remove)
        ratios = {u.name: 0.5 for u in analyze(removed, shape).shrinkable}
        both, both_spec = make_child(removed, removed_spec, ratios=ratios)
        return [(removed, removed_spec), (both, both_spec)]

    expected = children()
    with mode():
        got = children()
        groups = channel_groups(trace(teacher), describe(teacher, shape))
    assert groups == channel_groups(trace(teacher), describe(teacher, shape))
    for (want, want_spec), (child, child_spec) in zip(expected, got, strict=True):
        assert arch_hash(child_spec) == arch_hash(want_spec)
        assert torch.equal(child.eval()(x), want.eval()(x))
        # Built under no_grad or inference mode, the child is still an ordinary trainable net.
        assert all(p.requires_grad and not p.is_inference() for p in child.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher tensor {k} changed"


def test_a_removal_that_would_grow_the_network_is_left_out():
    torch.manual_seed(0)
    model = Narrowing().eval()
    spec = teacher_spec(base_spec(f"{__name__}:Narrowing", [3, 8, 8]))
    # Removing b (32 -> 16, 4,624 params) widens c by 16 inputs x 64 filters x 9 = 9,216.
    grown = remove_units(model, ["b"], [3, 8, 8])
    assert count_params(grown) - count_params(model) == 16 * 64 * 9 - (32 * 16 * 9 + 16)
    child, child_spec = make_child(model, spec, remove=["b"], allow_growth=False)
    assert child_spec["removed"] == [] and arch_hash(child_spec) == arch_hash(spec)
    assert count_params(child) == count_params(model)
    child, made = remove_without_growth(model, ["b", "c"], [3, 8, 8])
    assert made == ["b", "c"]  # together they shrink the network: fc reads 32 instead of 64
    assert (
        count_params(child)
        == count_params(model) - count_params(model.b) - count_params(model.c) + (32 - 64) * 10
    )


def test_traces_in_threads_at_once_do_not_corrupt_each_other():
    # torch.fx patches functions through one process-wide patcher, and random search steps its
    # envs in threads: two traces at once failed a Fashion-MNIST search ("CURRENT_PATCHER is
    # None in finally block").
    from concurrent.futures import ThreadPoolExecutor

    model = build_model({"arch": "resnet18", "kwargs": {"width": 0.25}})

    def many(_: int) -> int:
        return sum(len(trace(model).graph.nodes) for _ in range(15))

    with ThreadPoolExecutor(4) as pool:
        counts = list(pool.map(many, range(4)))
    assert len(set(counts)) == 1, counts
