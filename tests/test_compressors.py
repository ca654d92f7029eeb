"""The classic compressors: exact sparsity, masks that survive training, budgets met by the
least pruning, kept channels chosen by the stated criterion, and specs that rebuild the child."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from envs.builders import build_model
from envs.channels import channel_groups, current_channels, dependency_graph, pruning_group
from envs.checkpoint import build_from_spec
from envs.costs import count_params
from envs.graph import describe, trace
from envs.spec import arch_hash, base_spec, canonical, teacher_spec
from envs.surgery import spec_of
from pipeline.baselines.slimming import bn_l1_penalty, slim
from pipeline.baselines.structured import structured_l1
from pipeline.baselines.unstructured import make_permanent, prune_unstructured, sparsity
from pipeline.baselines.zoo_student import budget_student

DWSEP = ("dwsep", [1, 8, 8], {"width": 0.25, "in_channels": 1})  # depthwise coupling
RESNET = ("resnet18", [1, 8, 8], {"width": 0.125, "in_channels": 1})  # residual coupling
SMALL = ("small_cnn", [1, 8, 8], {})  # a hidden linear layer without BatchNorm


def _teacher(arch: str, shape: list[int], kwargs: dict) -> tuple[nn.Module, dict]:
    """A zoo network with random, distinct BatchNorm scales and statistics, in eval mode."""
    torch.manual_seed(0)
    spec = teacher_spec(base_spec(arch, shape, **kwargs))
    model = build_model(spec["base"]).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.05, 1.5)
            nn.init.uniform_(m.bias, -0.1, 0.1)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model, spec


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys(), "the compressor modified its input's structure"
    for k, v in before.items():
        assert torch.equal(after[k], v), f"the compressor modified input tensor {k}"


def _rebuilt_outputs(child: nn.Module, spec: dict, x: torch.Tensor) -> torch.Tensor:
    """Outputs of the network rebuilt from the spec alone plus the child's state_dict."""
    rebuilt = build_from_spec(spec)
    rebuilt.load_state_dict(child.state_dict())
    return rebuilt.eval()(x)


def _widened_params(spec: dict, full: dict[str, int]) -> int:
    """Parameters of the child with one more channel in every group that was cut.

    Each search step of the compressors changes a group's width by at most one channel, so
    the next less-pruned candidate is no larger than this: if the search stopped at the least
    pruning that fits, this network must not fit.
    """
    wide = {o: min(spec["channels"].get(o, n) + 1, n) for o, n in full.items()}
    return count_params(build_from_spec({**spec, "channels": wide}))


# --- unstructured ------------------------------------------------------------------------


@pytest.mark.parametrize("amount", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_zeroes_the_requested_fraction(scope, amount):
    teacher, _ = _teacher(*SMALL)
    before = _snapshot(teacher)
    pruned = prune_unstructured(teacher, amount, scope)
    layers = [m for m in pruned.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    weights = [m.weight.detach() for m in layers]
    n = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    counts = sparsity(pruned)
    if scope == "global":
        assert zeros == round(amount * n)
        # One threshold: every zeroed weight was at most as large as every kept one.
        orig = torch.cat([m.weight_orig.detach().abs().flatten() for m in layers])
        mask = torch.cat([m.weight_mask.flatten() for m in layers]).bool()
        assert orig[~mask].max() <= orig[mask].min()
    else:
        for w in weights:
            assert int((w == 0).sum()) == round(amount * w.numel())
    assert counts["prunable"] == n and counts["prunable_zeros"] == zeros
    assert counts["sparsity"] == pytest.approx(zeros / n)
    assert counts["params"] == count_params(teacher)
    assert counts["nonzero_params"] == counts["params"] - zeros
    _assert_unchanged(teacher, before)


def test_masks_survive_training_and_make_permanent_keeps_the_zeros():
    teacher, spec = _teacher(*SMALL)
    pruned = prune_unstructured(teacher, 0.6, "global").train()
    masks = {n: b.clone() for n, b in pruned.named_buffers() if n.endswith("weight_mask")}
    opt = torch.optim.SGD(pruned.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    torch.manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        opt.zero_grad()
        nn.functional.cross_entropy(pruned(x), y).backward()
        opt.step()
    pruned.eval()
    x = torch.randn(4, 1, 8, 8)
    out = pruned(x)
    for name, mask in masks.items():
        weight = pruned.get_submodule(name.rpartition(".")[0]).weight
        assert torch.count_nonzero(weight[mask == 0]) == 0, f"{name}: a pruned weight came back"
    kept = masks["features.0.weight_mask"].bool()
    assert not torch.equal(pruned.features[0].weight[kept], teacher.features[0].weight[kept])
    counts = sparsity(pruned)

    assert make_permanent(pruned) is pruned
    state = pruned.state_dict()
    assert state.keys() == teacher.state_dict().keys()  # plain "weight" keys, no masks
    assert sparsity(pruned) == counts
    assert torch.equal(pruned(x), out)
    assert torch.equal(_rebuilt_outputs(pruned, spec, x), out)  # saves as spec + state_dict


def test_bad_unstructured_requests_fail_clearly():
    teacher, _ = _teacher(*SMALL)
    for amount in (1.0, -0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
            prune_unstructured(teacher, amount)
    with pytest.raises(ValueError, match="scope 'local' is unknown: use 'global'"):
        prune_unstructured(teacher, 0.5, "local")


def test_bn_l1_penalty_is_the_sum_of_absolute_gammas():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4, affine=False), nn.Flatten(),
        nn.LazyLinear(3), nn.BatchNorm1d(3),
    )  # fmt: skip
    model[1].weight.data = torch.tensor([0.5, -1.0, 2.0, -0.25])
    model[5].weight.data = torch.tensor([-3.0, 0.0, 1.0])
    penalty = bn_l1_penalty(model)
    assert penalty.item() == pytest.approx(0.5 + 1.0 + 2.0 + 0.25 + 3.0 + 0.0 + 1.0)
    penalty.backward()
    assert torch.equal(model[1].weight.grad, torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert bn_l1_penalty(nn.Linear(2, 2)).item() == 0.0


# --- Network Slimming --------------------------------------------------------------------


def _bn_groups(model: nn.Module, shape: list[int]) -> dict[str, list[str]]:
    """The BatchNorms of every coupled channel group, by owner, found by Torch-Pruning."""
    gm = trace(model)
    dg = dependency_graph(gm, shape)
    names = {m: n for n, m in gm.named_modules()}
    groups = {}
    for g in channel_groups(gm, describe(gm, shape, count_flops=False), dg):
        root = gm.get_submodule(g.owner)
        deps = pruning_group(dg, root, range(g.channels))
        bns = {
            names[d.target.module] for d, _ in deps if isinstance(d.target.module, nn.BatchNorm2d)
        }
        groups[g.owner] = sorted(bns)
    return groups


@pytest.mark.parametrize(("arch", "shape", "kwargs"), [DWSEP, RESNET], ids=["dwsep", "resnet18"])
def test_slim_drops_the_globally_smallest_gammas_to_the_budget(arch, shape, kwargs):
    teacher, spec = _teacher(arch, shape, kwargs)
    before = _snapshot(teacher)
    target = count_params(teacher) // 2
    child, child_spec = slim(teacher, spec, target, min_channels=4)
    x = torch.randn(3, *shape)

    assert count_params(child) <= target
    assert _widened_params(child_spec, current_channels(teacher, shape)) > target
    assert torch.equal(_rebuilt_outputs(child, child_spec, x), child.eval()(x))
    _assert_unchanged(teacher, before)

    kept_scores, dropped_scores = [], []
    for owner, bns in _bn_groups(teacher, shape).items():
        gammas = [teacher.get_submodule(b).weight.detach() for b in bns]
        score = torch.stack([g.abs() for g in gammas]).mean(dim=0)
        # Random gammas are distinct: the survivors' values say which channels were kept.
        new = child.get_submodule(bns[0]).weight.detach()
        kept = torch.nonzero(torch.isin(gammas[0], new)).flatten()
        assert len(kept) == len(new) >= 4
        for b, g in zip(bns, gammas, strict=True):  # same channels, in order, in every BN
            assert torch.equal(child.get_submodule(b).weight, g[kept])
        top = score.argsort(descending=True)[: len(kept)].sort().values
        assert torch.equal(kept, top), f"group {owner} did not keep its largest gammas"
        dropped = torch.ones_like(score, dtype=torch.bool)
        dropped[kept] = False
        dropped_scores.append(score[dropped])
        if len(kept) > 4:  # a group at the floor may keep channels below the threshold
            kept_scores.append(score[kept])
    assert torch.cat(dropped_scores).max() <= torch.cat(kept_scores).min(), "no global threshold"


def test_slim_with_room_to_spare_is_an_exact_copy():
    teacher, spec = _teacher(*RESNET)
    x = torch.randn(3, *RESNET[1])
    child, child_spec = slim(teacher, spec, count_params(teacher))
    assert child is not teacher
    assert torch.equal(child.eval()(x), teacher(x))
    assert arch_hash(child_spec) == arch_hash(spec)
    with torch.no_grad():
        child.get_submodule("conv1").weight.zero_()
    assert torch.count_nonzero(teacher.conv1.weight) > 0  # a copy, not a view


def test_slim_stops_at_min_channels_and_leaves_groups_without_batchnorm():
    teacher, spec = _teacher(*SMALL)
    child, child_spec = slim(teacher, spec, 1, min_channels=6)
    assert count_params(child) > 1  # out of reach: the caller sees it from the count
    widths = current_channels(child, SMALL[1])
    assert widths.pop("hidden") == 128  # a Linear without BatchNorm: slimming cannot judge it
    assert set(widths.values()) == {6}
    x = torch.randn(3, *SMALL[1])
    assert torch.equal(_rebuilt_outputs(child, child_spec, x), child.eval()(x))


class NoBatchNorm(nn.Module):
    """A user's network without BatchNorm: nothing for Network Slimming to rank."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(torch.relu(self.a(x))).mean(dim=(2, 3)))


def test_slim_needs_batchnorm():
    spec = teacher_spec(base_spec(f"{__name__}:NoBatchNorm", [1, 8, 8]))
    with pytest.raises(ValueError, match="Network Slimming needs BatchNorm layers"):
        slim(NoBatchNorm(), spec, 100)


# --- structured L1 -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "arch", "shape", "kwargs"),
    [("uniform", *DWSEP), ("global", *RESNET)],
    ids=["uniform-dwsep", "global-resnet18"],
)
def test_structured_l1_meets_the_budget_with_the_least_pruning(mode, arch, shape, kwargs):
    teacher, spec = _teacher(arch, shape, kwargs)
    before = _snapshot(teacher)
    full = current_channels(teacher, shape)
    target = int(count_params(teacher) * 0.4)
    child, child_spec = structured_l1(teacher, spec, target, mode=mode, min_channels=4)
    x = torch.randn(3, *shape)

    assert count_params(child) <= target
    assert _widened_params(child_spec, full) > target
    assert torch.equal(_rebuilt_outputs(child, child_spec, x), child.eval()(x))
    assert child(x).shape == (3, 10)  # the classifier keeps its outputs
    _assert_unchanged(teacher, before)
    widths = {**full, **child_spec["channels"]}
    assert min(widths.values()) >= 4
    if mode == "uniform":  # the same ratio everywhere: equal groups stay equal, order kept
        for a in full:
            for b in full:
                if full[a] <= full[b]:
                    assert widths[a] <= widths[b], (a, b)


def test_structured_l1_with_room_to_spare_is_an_exact_copy_and_bad_mode_fails():
    teacher, spec = _teacher(*DWSEP)
    x = torch.randn(3, *DWSEP[1])
    child, child_spec = structured_l1(teacher, spec, 10**9, mode="global")
    assert torch.equal(child.eval()(x), teacher(x))
    assert child_spec == canonical(spec) == spec_of(child, spec)
    with pytest.raises(ValueError, match="mode 'local' is unknown: use 'uniform'"):
        structured_l1(teacher, spec, 1000, mode="local")
    with pytest.raises(ValueError, match="budget -5 is not a positive count"):
        structured_l1(teacher, spec, -5)


# --- hand-designed student ---------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", "dwsep"])
@pytest.mark.parametrize("target", [20_000, 100_000, 400_000])
def test_budget_student_is_as_wide_as_the_budget_allows(arch, target):
    torch.manual_seed(3)
    model, spec = budget_student(arch, target, [1, 28, 28], 10)
    params = count_params(model)
    assert 0.8 * target <= params <= target
    width = spec["base"]["kwargs"]["width"]
    # 1/32 more width adds a channel to every stage of these nets: it must break the budget.
    wider = {**spec["base"]["kwargs"], "width": width + 1 / 32}
    assert count_params(build_model({**spec["base"], "kwargs": wider})) > target
    torch.manual_seed(3)
    again, _ = budget_student(arch, target, [1, 28, 28], 10)  # seeded by the caller
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(_rebuilt_outputs(model, spec, x), again.eval()(x))
    assert model.eval()(x).shape == (2, 10)


def test_budget_student_rejects_an_impossible_budget():
    with pytest.raises(ValueError, match=r"budget 1,000 params is below the narrowest 'resnet18'"):
        budget_student("resnet18", 1000, [3, 32, 32], 10)
    with pytest.raises(ValueError, match="chooses the width of 'dwsep' itself"):
        budget_student("dwsep", 10_000, [3, 32, 32], 10, width=0.5)
