"""Checkpoints rebuild from spec.json + weights.pt alone; bad files are rejected clearly."""

from __future__ import annotations

import json

import pytest
import torch

from envs.builders import build_model
from envs.checkpoint import load_checkpoint, save_checkpoint
from envs.spec import arch_hash, base_spec, teacher_spec
from envs.surgery import make_child


@pytest.fixture
def student(tmp_path):
    torch.manual_seed(0)
    spec = teacher_spec(base_spec("resnet18", [3, 16, 16], width=0.25))
    teacher = build_model(spec["base"]).eval()
    child, child_spec = make_child(teacher, spec, remove=["layer1.1"], ratios={"layer2.0": 0.5})
    return child.eval(), child_spec


def test_round_trip_reproduces_outputs(tmp_path, student):
    model, spec = student
    save_checkpoint(tmp_path / "s", model, spec, {"val_accuracy": 0.5})
    loaded = load_checkpoint(tmp_path / "s", num_classes=10)
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(loaded.model(x), model(x))
    assert arch_hash(loaded.spec) == arch_hash(spec) and loaded.metrics == {"val_accuracy": 0.5}


def test_hash_ignores_order_and_sees_differences(student):
    _, spec = student
    shuffled = {
        **spec,
        "removed": list(reversed(spec["removed"])),
        "channels": dict(reversed(spec["channels"].items())),
    }
    assert arch_hash(shuffled) == arch_hash(spec)
    assert arch_hash({**spec, "removed": []}) != arch_hash(spec)


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "a pickled module"])
def test_a_damaged_weights_file_gets_one_line_with_the_fix(tmp_path, student, damage):
    model, spec = student
    path = save_checkpoint(tmp_path / "s", model, spec)
    weights = path / "weights.pt"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "random bytes":
        weights.write_bytes(bytes(range(256)) * 4)
    else:
        torch.save(model, weights)  # the whole module pickled, not its state_dict
    with pytest.raises(ValueError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message and "weights_only" not in message and str(weights) in message
    if damage == "a pickled module":
        assert "not a state_dict" in message and "envs.save_checkpoint" in message
    else:
        assert "damaged, truncated or not a PyTorch weights file" in message
        assert "n2n teacher" in message


def test_weights_of_another_architecture_are_rejected(tmp_path, student):
    model, spec = student
    path = save_checkpoint(tmp_path / "s", model, spec)
    other = {**spec, "channels": {}}
    (path / "spec.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="do not match"):
        load_checkpoint(path)


def test_wrong_number_of_classes_and_missing_files(tmp_path, student):
    model, spec = student
    path = save_checkpoint(tmp_path / "s", model, spec)
    with pytest.raises(ValueError, match="predicts 10 classes but the dataset has 100"):
        load_checkpoint(path, num_classes=100)
    (path / "spec.json").unlink()
    with pytest.raises(ValueError, match="has no spec.json"):
        load_checkpoint(path)


def test_unknown_architecture_is_explained():
    with pytest.raises(ValueError, match="unknown architecture 'resnet19'"):
        build_model({"arch": "resnet19"})
