"""Student specs, canonical architecture hashes and checkpoints.

A *student spec* says how to rebuild a network from scratch, without pickling a module::

    {"format": "n2n-student/1",
     "base": {"arch": "resnet18", "kwargs": {...}, "input_shape": [3, 32, 32]},
     # "base" may also hold "adapt": {"features.0.0": {"in_channels": 1}} (envs.models.fit_arch)
     "removed": ["layer1.1", "layer3.1"],            # units removed, by module path
     "channels": {"conv1": 16, "layer1.0.conv1": 8}}  # output channels per coupled group

``channels`` is keyed by the first layer of each coupled channel group (see
``envs.surgery``) and lists every group, so two specs that build the same network are equal
after canonicalisation and share one :func:`arch_hash`. A teacher is a spec with nothing
removed and its own channel counts. A checkpoint is a folder holding ``spec.json`` and
``weights.pt`` (a ``state_dict``), plus ``metrics.json`` when known.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from envs.models import build_model

SPEC_FORMAT = "n2n-student/1"
SPEC_FILE, WEIGHTS_FILE, METRICS_FILE = "spec.json", "weights.pt", "metrics.json"


def base_spec(arch: str, input_shape: list[int], **kwargs: Any) -> dict[str, Any]:
    """An architecture spec for a zoo name or import path, e.g. ``base_spec("vgg11", [3, 32, 32])``."""
    return {"arch": arch, "kwargs": kwargs, "input_shape": [int(d) for d in input_shape]}


def teacher_spec(base: dict[str, Any]) -> dict[str, Any]:
    """The student spec of an unmodified network."""
    validate_base(base)
    return {"format": SPEC_FORMAT, "base": copy.deepcopy(base), "removed": [], "channels": {}}


def validate_base(base: dict[str, Any]) -> None:
    """Raises ``ValueError`` naming what is wrong with an architecture spec."""
    if not isinstance(base, dict) or "arch" not in base:
        raise ValueError(f"architecture spec {base!r} needs an 'arch' key")
    shape = base.get("input_shape")
    if not (isinstance(shape, list | tuple) and len(shape) == 3 and all(int(d) > 0 for d in shape)):
        raise ValueError(
            f"architecture spec for {base['arch']!r} needs 'input_shape' [channels, height, width], got {shape!r}"
        )
    adapt = base.get("adapt")
    if adapt is not None and not (
        isinstance(adapt, dict)
        and all(
            isinstance(sizes, dict)
            and sizes
            and set(sizes) <= {"in_channels", "out_channels"}
            and all(isinstance(n, int) and n > 0 for n in sizes.values())
            for sizes in adapt.values()
        )
    ):
        raise ValueError(
            f"architecture spec for {base['arch']!r} has 'adapt' {adapt!r}; it must map layer "
            "paths to {'in_channels': n} and/or {'out_channels': n}"
        )


def canonical(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with sorted removals and channel map, as hashed and saved."""
    if spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"spec format {spec.get('format')!r} is not {SPEC_FORMAT!r}")
    validate_base(spec["base"])
    return {
        "format": SPEC_FORMAT,
        "base": spec["base"],
        "removed": sorted(spec.get("removed", [])),
        "channels": {k: int(v) for k, v in sorted(spec.get("channels", {}).items())},
    }


def arch_hash(spec: dict[str, Any]) -> str:
    """A 16-hex-digit hash that is equal for specs describing the same network."""
    text = json.dumps(canonical(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuilds the (randomly initialised) network a spec describes; load weights after."""
    from envs.surgery import apply_spec  # surgery imports this module

    return apply_spec(build_model(spec["base"]), canonical(spec))


@dataclass
class Checkpoint:
    """A model rebuilt from a checkpoint folder."""

    model: nn.Module
    spec: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    path: str | Path, model: nn.Module, spec: dict[str, Any], metrics: dict[str, Any] | None = None
) -> Path:
    """Writes ``spec.json``, ``weights.pt`` and (if given) ``metrics.json`` into folder ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / SPEC_FILE).write_text(json.dumps(canonical(spec), indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, path / WEIGHTS_FILE)
    if metrics is not None:
        (path / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    return path


def load_checkpoint(path: str | Path, num_classes: int | None = None) -> Checkpoint:
    """Rebuilds a model from ``spec.json`` + ``weights.pt``.

    Raises:
        ValueError: the folder lacks a file, a file is truncated or corrupt, the weights do not
            fit the spec, or the model has another number of classes than ``num_classes``.
    """
    path = Path(path)
    for name in (SPEC_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise ValueError(f"checkpoint {path} has no {name}; save it with envs.save_checkpoint")
    try:
        spec = json.loads((path / SPEC_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint {path / SPEC_FILE} is not valid JSON ({err})") from err
    try:
        state = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(
            f"checkpoint {path / WEIGHTS_FILE} cannot be read ({type(err).__name__}: {err}); "
            "it may be truncated: save it again"
        ) from err
    model = build_from_spec(spec)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ValueError(
            f"weights in {path / WEIGHTS_FILE} do not match {path / SPEC_FILE}: "
            f"{first[1].strip() if len(first) > 1 else first[0]}"
        ) from err
    if num_classes is not None:
        found = output_classes(model, spec)
        if found != num_classes:
            raise ValueError(
                f"checkpoint {path} predicts {found} classes but the dataset has {num_classes}; "
                "train a teacher for this dataset (n2n teacher)"
            )
    metrics_file = path / METRICS_FILE
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    model.eval()
    return Checkpoint(model=model, spec=canonical(spec), metrics=metrics)


def output_classes(model: nn.Module, spec: dict[str, Any]) -> int:
    """Number of outputs of ``model`` for one input of the spec's shape."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, *spec["base"]["input_shape"]))
    model.train(was_training)
    return int(out.shape[-1])
