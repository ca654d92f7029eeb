"""Bring your own model: torchvision builders and a user's own module as teachers.

A builder gets only the keyword arguments it accepts; a network made for RGB images is
adapted to 1-channel data by one recorded layer swap, so its spec rebuilds it exactly; removal
never makes a child larger than its parent, so no valid child scores below a failed one (-1);
and the real ``n2n`` command compresses such teachers end to end.
"""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision import models

from envs.builders import build_model, fit_arch
from envs.checkpoint import load_checkpoint, save_checkpoint
from envs.costs import count_params
from envs.graph import trace
from envs.rewards import FAILED_REWARD, ChildScore, n2n_reward
from envs.spec import teacher_spec
from envs.surgery import analyze, make_child, remove_units, remove_without_growth
from pipeline.config.presets import load_config
from pipeline.config.schema import ConfigError
from pipeline.data.teachers import teacher_base_spec

MOBILENET = "torchvision.models:mobilenet_v2"


# --------------------------------------------------------------------------- builders


@pytest.mark.parametrize(
    ("arch", "kwargs", "shape", "stem"),
    [
        (MOBILENET, {"width_mult": 0.25}, [1, 8, 8], "features.0.0"),  # digits
        (MOBILENET, {"width_mult": 0.25}, [1, 28, 28], "features.0.0"),  # Fashion-MNIST
        ("torchvision.models:resnet18", {}, [1, 8, 8], "conv1"),
    ],
    ids=["mobilenet_v2-digits", "mobilenet_v2-fashion", "resnet18-digits"],
)
def test_torchvision_builders_fit_one_channel_data(arch, kwargs, shape, stem, tmp_path):
    base = fit_arch(arch, kwargs, shape, 10, optional={"width": 1.0})
    # Neither in_channels nor width is passed: torchvision's builders refuse both.
    assert base["kwargs"] == {**kwargs, "num_classes": 10}
    assert base["adapt"] == {stem: {"in_channels": 1}}

    builder = getattr(models, arch.partition(":")[2])
    torch.manual_seed(0)
    rgb = builder(**kwargs, num_classes=10).eval()
    torch.manual_seed(0)
    grey = build_model(base).eval()
    # The stem's filters are summed over RGB: a grey image gives what the RGB network gives
    # on that image copied into its three channels; every other weight is the builder's own.
    assert grey.get_submodule(stem).weight.shape[1] == 1
    x = torch.randn(2, *shape)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)
    rgb_state = rgb.state_dict()
    for key, value in grey.state_dict().items():
        if not key.startswith(stem + "."):
            assert torch.equal(value, rgb_state[key]), key

    spec = teacher_spec(base)
    save_checkpoint(tmp_path / "teacher", grey, spec)
    loaded = load_checkpoint(tmp_path / "teacher", num_classes=10)
    assert loaded.spec["base"]["adapt"] == base["adapt"]
    with torch.no_grad():
        assert torch.equal(loaded.model(x), grey(x))


class _Net(nn.Module):
    """A user's network for RGB images with a fixed number of outputs."""

    def __init__(self, num_classes: int = 7, depth: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()]
        for _ in range(depth):
            layers += [nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def classes_only(num_classes: int) -> nn.Module:
    """Takes the classes but not the channels: the stem is adapted."""
    return _Net(num_classes)


def fixed() -> nn.Module:
    """Takes nothing: stem and classifier are both adapted."""
    return _Net()


def forwards(**kwargs) -> nn.Module:
    """Forwards everything, as torchvision's builders do: refused arguments are not passed."""
    return _Net(**kwargs)


@pytest.mark.parametrize(
    ("builder", "kwargs", "passed", "adapt"),
    [
        ("classes_only", {}, {"num_classes": 10}, {"features.0": {"in_channels": 1}}),
        (
            "fixed",
            {},
            {},
            {"features.0": {"in_channels": 1}, "head": {"out_channels": 10}},
        ),
        (
            "forwards",
            {"depth": 2},
            {"depth": 2, "num_classes": 10},
            {"features.0": {"in_channels": 1}},
        ),
    ],
)
def test_builders_get_only_the_kwargs_they_accept(builder, kwargs, passed, adapt):
    base = fit_arch(f"{__name__}:{builder}", kwargs, [1, 8, 8], 10, optional={"width": 1.0})
    assert base["kwargs"] == passed and base["adapt"] == adapt
    model = build_model(base).eval()
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert count_params(model) == count_params(build_model(base))


def test_bad_builder_arguments_are_one_clear_error(digits):
    with pytest.raises(ValueError, match=rf"'{MOBILENET}' rejects keyword argument 'widht_mult'"):
        fit_arch(MOBILENET, {"widht_mult": 0.25}, [1, 8, 8], 10)
    with pytest.raises(ValueError, match=rf"'{MOBILENET}' rejects keyword argument 'depth'"):
        build_model({"arch": MOBILENET, "kwargs": {"depth": 3}})
    with pytest.raises(ValueError, match=r"teacher.width=0.5 has no effect.*width_mult"):
        teacher_base_spec({"arch": MOBILENET, "kwargs": {}, "width": 0.5}, digits)
    # The config passes teacher.kwargs through and width only where the builder takes it.
    cfg = load_config("demo", [f"teacher.arch={MOBILENET}", "teacher.kwargs.width_mult=0.25"])
    base = teacher_base_spec(cfg.teacher.arch_spec(), digits)
    assert base["kwargs"] == {"width_mult": 0.25, "num_classes": 10}
    zoo = teacher_base_spec(load_config("demo", ["teacher.width=0.5"]).teacher.arch_spec(), digits)
    assert zoo["kwargs"] == {"width": 0.5, "num_classes": 10, "in_channels": 1}
    with pytest.raises(ConfigError, match=r"teacher.kwargs.*set teacher.width instead"):
        load_config("demo", ["teacher.kwargs={width: 0.5}"])


# --------------------------------------------------------------------------- removal


@pytest.fixture(scope="module")
def mobilenet():
    """torchvision's MobileNetV2 at a tenth of its width, for 1-channel 8x8 images."""
    base = fit_arch(MOBILENET, {"width_mult": 0.1}, [1, 8, 8], 10)
    torch.manual_seed(0)
    return trace(build_model(base).eval()), teacher_spec(base)


def test_removal_never_grows_an_inverted_residual_net(mobilenet):
    model, spec = mobilenet
    shape = spec["base"]["input_shape"]
    parent = count_params(model)
    units = analyze(model, shape).units
    removable = [u.name for u in units if u.removable]
    # The problem is real: removing a projection conv (it narrows the channels) on its own
    # widens the next 1x1 conv by more weights than it held.
    growers = [
        u.name
        for u in units
        if u.removable
        and u.in_channels > u.out_channels
        and count_params(remove_units(model, [u.name], shape)) > parent
    ]
    assert growers
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores shared with Ray workers; small ops run faster on one
    rng = random.Random(0)
    dropped = 0
    try:
        for _ in range(100):
            requested = [u for u in removable if rng.random() < 0.5]
            child, made = remove_without_growth(model, requested, shape)
            assert set(made) <= set(requested)
            dropped += len(made) < len(requested)
            params = count_params(child)
            assert params <= parent, requested
            for accuracy in (0.0, rng.random()):
                score = ChildScore(accuracy, 0.9, params=params, teacher_params=parent)
                assert n2n_reward(score) > FAILED_REWARD
    finally:
        torch.set_num_threads(before)
    assert dropped > 0  # the property was tested where it matters


def test_the_plain_make_child_never_grows_the_network(mobilenet):
    """The safe behaviour is the default: a caller of ``make_child`` gets a child no larger
    than its parent without asking, and the child's spec lists only the removals made."""
    model, spec = mobilenet
    shape = spec["base"]["input_shape"]
    parent = count_params(model)
    removable = [u.name for u in analyze(model, shape).units if u.removable]
    rng = random.Random(1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    dropped = 0
    try:
        for _ in range(20):
            requested = [u for u in removable if rng.random() < 0.5]
            child, child_spec = make_child(model, spec, remove=requested)
            assert count_params(child) <= parent, requested
            assert set(child_spec["removed"]) <= set(requested)
            dropped += len(child_spec["removed"]) < len(requested)
        grown, _ = make_child(model, spec, remove=requested, allow_growth=True)
    finally:
        torch.set_num_threads(before)
    assert dropped > 0  # some requests would have grown the network
    assert count_params(grown) >= count_params(child)


# --------------------------------------------------------------------------- end to end


def _tiny_run(run_dir: Path, *extra: str) -> list[str]:
    """``n2n run`` on digits at the smallest budget that still runs every step."""
    return [
        "run", "--run-dir", str(run_dir), "--no-tracking", "--quiet", "--iterations", "1",
        "--episodes", "2", "--set", "teacher.epochs=1", "--set", "data.max_train=256",
        "--set", "distill.steps=5", "--set", "finetune.steps=5", "--set", "finetune.top_k=1",
        "--set", "ray.cpus_per_child=1", *extra,
    ]  # fmt: skip


def _check_finished(run_dir: Path, arch: str) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    teacher, student = summary["teacher"], summary["student"]
    assert teacher["arch"] == arch
    assert student["params"] < teacher["params"]
    with (run_dir / "children.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["stage"] for r in rows} == {"removal", "shrinkage"}
    assert not [r["error"] for r in rows if r["error"]]
    assert all(int(r["params"]) <= teacher["params"] for r in rows)
    best = load_checkpoint(run_dir / "best", num_classes=10)
    assert best.spec["base"]["arch"] == arch
    assert count_params(best.model) == student["params"]
    return best.spec


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("arch", "extra", "stem"),
    [
        (MOBILENET, ["--set", "teacher.kwargs={width_mult: 0.25}"], "features.0.0"),
        ("torchvision.models:resnet18", [], "conv1"),
    ],
    ids=["mobilenet_v2", "resnet18"],
)
def test_torchvision_teacher_end_to_end(ray_cluster, tmp_path, arch, extra, stem):
    from pipeline.cli.main import main

    run_dir = tmp_path / "run"
    assert main(_tiny_run(run_dir, "--set", f"teacher.arch={arch}", *extra)) == 0
    spec = _check_finished(run_dir, arch)
    assert spec["base"]["adapt"] == {stem: {"in_channels": 1}}


MYNETS = """
from torch import nn


def tiny(num_classes):
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_builder_in_the_current_directory_reaches_every_ray_worker(
    ray_cluster, tmp_path, monkeypatch
):
    """``teacher.arch: mynets:tiny`` with ``mynets.py`` only in the working directory: the env
    runners and the child-training tasks (other processes) must import it too."""
    (tmp_path / "mynets.py").write_text(textwrap.dedent(MYNETS))
    run_dir = tmp_path / "run"
    address = ray_cluster.get_runtime_context().gcs_address
    n2n = Path(sys.executable).with_name("n2n")
    proc = subprocess.run(
        [str(n2n), *_tiny_run(run_dir, "--address", address, "--set", "teacher.arch=mynets:tiny")],
        cwd=tmp_path, capture_output=True, text=True, timeout=220,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    monkeypatch.syspath_prepend(str(tmp_path))  # to reload the student here
    monkeypatch.delitem(sys.modules, "mynets", raising=False)
    spec = _check_finished(run_dir, "mynets:tiny")
    assert spec["base"]["kwargs"] == {"num_classes": 10} and "adapt" not in spec["base"]


# --------------------------------------------------------------------------- snapshots


@pytest.mark.parametrize(
    "build",
    [lambda: torchvision.models.resnet18(num_classes=10),
     lambda: torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25)],
    ids=["resnet18", "mobilenet_v2"],
)  # fmt: skip
def test_a_model_without_a_builder_round_trips_as_a_snapshot(build, tmp_path):
    """An in-memory model is described as JSON (layers and fx forward source), rebuilt equal,
    and its children reload from spec.json + weights.pt alone."""
    import json

    from envs.snapshot import SNAPSHOT, snapshot

    torch.manual_seed(0)
    model = build().eval()
    base = {"arch": SNAPSHOT, "kwargs": {}, "input_shape": [3, 32, 32],
            "snapshot": json.loads(json.dumps(snapshot(model)))}  # fmt: skip
    rebuilt = build_model(base)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(rebuilt.eval()(x), model(x), atol=1e-6)
    shrinkable = [u.name for u in analyze(rebuilt, [3, 32, 32]).units if u.shrinkable]
    child, spec = make_child(rebuilt, teacher_spec(base), ratios={shrinkable[0]: 0.5})
    save_checkpoint(tmp_path / "child", child, spec)
    assert torch.allclose(load_checkpoint(tmp_path / "child").model(x), child.eval()(x))
    assert count_params(child) < count_params(model)


def test_a_snapshot_refuses_what_it_cannot_describe():
    from envs.snapshot import snapshot

    class Custom(torch.nn.Module):  # a layer outside torch.nn
        def forward(self, x):
            return x * 2

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3)
            self.scale = torch.nn.Parameter(torch.ones(1))  # a parameter outside a layer
            self.custom = Custom()

        def forward(self, x):
            return self.custom(self.conv(x)) * self.scale

    with pytest.raises(ValueError, match="holds \\['scale'\\] outside its layers"):
        snapshot(Holder())
