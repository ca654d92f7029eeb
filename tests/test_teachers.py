"""Teacher training on real digits, its checkpoint round trip and the checks on loading it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from envs.costs import count_params
from pipeline.data.datasets import load_dataset
from pipeline.data.teachers import TeacherTraining, load_teacher, teacher_base_spec, train_teacher

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, metrics = train_teacher(
            {"arch": "small_cnn", "kwargs": {"width": 0.5}},
            digits,
            TeacherTraining(epochs=10, augment="shift"),
            out_dir=out,
        )
    finally:
        torch.set_num_threads(before)
    return out, model, metrics


def test_teacher_learns_digits_and_reports_its_costs(trained):
    out, model, metrics = trained
    assert metrics["val_accuracy"] > 0.9 and metrics["test_accuracy"] > 0.85
    assert metrics["params"] == count_params(model)
    assert metrics["flops"] > 0 and metrics["steps"] == 10 * (1295 // 128)
    assert metrics["dataset"]["input_shape"] == [1, 8, 8]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["val_accuracy"] == metrics["val_accuracy"]


def test_checkpoint_round_trip_reproduces_outputs(trained, digits):
    out, model, _ = trained
    loaded = load_teacher(out, digits)
    x = digits.val[0][:32]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model.eval()(x))
    assert loaded.spec["base"]["kwargs"] == {"width": 0.5, "num_classes": 10, "in_channels": 1}


def test_loading_rejects_a_teacher_for_other_data(trained, digits):
    out, _, _ = trained
    bigger = dataclasses.replace(digits, input_shape=(1, 28, 28), name="fashion-mnist")
    with pytest.raises(
        ValueError,
        match=r"expects images of shape \[1, 8, 8\] but dataset 'fashion-mnist' has \[1, 28, 28\]",
    ):
        load_teacher(out, bigger)
    fewer = dataclasses.replace(digits, num_classes=5)
    with pytest.raises(ValueError, match="predicts 10 classes but the dataset has 5"):
        load_teacher(out, fewer)


def test_truncated_weights_are_rejected(trained, digits, tmp_path):
    out, _, _ = trained
    for name in ("spec.json", "metrics.json"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    (tmp_path / "weights.pt").write_bytes((out / "weights.pt").read_bytes()[:500])
    with pytest.raises(ValueError, match="truncated"):
        load_teacher(tmp_path, digits)


def test_arch_spec_is_completed_from_the_dataset(digits):
    base = teacher_base_spec("vgg11", digits)
    assert base == {
        "arch": "vgg11",
        "kwargs": {"num_classes": 10, "in_channels": 1, "image_size": 8},
        "input_shape": [1, 8, 8],
    }
    with pytest.raises(ValueError, match="sets num_classes=100 but dataset 'digits' has 10"):
        teacher_base_spec({"arch": "resnet18", "kwargs": {"num_classes": 100}}, digits)
    with pytest.raises(ValueError, match="unknown architecture 'resnet19'"):
        teacher_base_spec("resnet19", digits)


def test_max_steps_and_bad_settings(digits):
    model, metrics = train_teacher("small_cnn", digits, TeacherTraining(max_steps=3, epochs=50))
    assert metrics["steps"] == 3
    with pytest.raises(ValueError, match="teacher augment 'mixup'"):
        TeacherTraining(augment="mixup")


def test_a_torchvision_teacher_trains_on_grey_images_and_reloads(digits, tmp_path):
    arch = {"arch": "torchvision.models:mobilenet_v2", "kwargs": {"width_mult": 0.25}, "width": 1.0}
    model, metrics = train_teacher(arch, digits, TeacherTraining(max_steps=2), out_dir=tmp_path)
    loaded = load_teacher(tmp_path, digits)
    assert loaded.spec["base"]["kwargs"] == {"width_mult": 0.25, "num_classes": 10}
    assert loaded.spec["base"]["adapt"] == {"features.0.0": {"in_channels": 1}}
    x = digits.val[0][:8]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model.eval()(x))
    assert metrics["params"] == count_params(loaded.model) and metrics["steps"] == 2


@pytest.mark.timeout(180)
def test_teacher_training_off_a_terminal_prints_a_line_per_epoch(tmp_path):
    """``n2n teacher`` writing to a pipe (a ``ray job`` or pod log) says how far it is after
    every epoch instead of staying silent until the end."""
    out = tmp_path / "teacher"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "teacher", "--out", str(out),
         "--set", "teacher.epochs=3", "--set", "data.max_train=300"],
        cwd=REPO, capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    epochs = [ln for ln in lines if ": epoch " in ln]
    assert [ln.split(": epoch ")[1].split(",")[0] for ln in epochs] == ["1/3", "2/3", "3/3"]
    assert all(
        ln.startswith("teacher small_cnn on digits: epoch") and " loss " in ln for ln in epochs
    )
    assert lines[-1].startswith("teacher small_cnn on digits:") and str(out) in lines[-1]
