"""Checkpoints: a network saved as ``spec.json`` + ``weights.pt`` and rebuilt from them alone.

A checkpoint folder holds the student spec (``envs.spec``), the ``state_dict`` and, when
known, ``metrics.json``. :func:`build_from_spec` rebuilds the network a spec describes by
applying its surgery (``envs.surgery.apply_spec``) to a freshly built base model, so this
module sits above the surgery, which only needs the specs themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from envs.builders import build_model
from envs.spec import METRICS_FILE, SPEC_FILE, WEIGHTS_FILE, canonical, teacher_spec
from envs.surgery import apply_spec


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuilds the (randomly initialised) network a spec describes; load weights after."""
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
    state = _read_weights(path / WEIGHTS_FILE)
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


def load_network(source: Any, what: str = "teacher") -> tuple[nn.Module, dict[str, Any]]:
    """A network and its student spec from a checkpoint folder, a student spec or an arch spec."""
    if isinstance(source, str | Path):
        ckpt = load_checkpoint(source)
        return ckpt.model, ckpt.spec
    if isinstance(source, dict) and "format" in source:
        spec = canonical(source)
        return build_from_spec(spec).eval(), spec
    if isinstance(source, dict) and "arch" in source:
        spec = teacher_spec(source)
        return build_model(source).eval(), spec
    raise ValueError(
        f"{what} {source!r} must be a checkpoint folder, a student spec or an architecture "
        "spec {'arch', 'kwargs', 'input_shape'}"
    )


def output_classes(model: nn.Module, spec: dict[str, Any]) -> int:
    """Number of outputs of ``model`` for one input of the spec's shape."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, *spec["base"]["input_shape"]))
    model.train(was_training)
    return int(out.shape[-1])


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` in ``path``, read without unpickling code (``weights_only``).

    Torch's own messages for a bad file are long and suggest ``weights_only=False``, which
    would run whatever code the file holds and cannot mend a damaged one; the error here says
    what is wrong with the file and what to do instead.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        if "Unsupported global" in str(err):
            raise ValueError(
                f"checkpoint {path} holds pickled Python objects (a whole model?), not a "
                "state_dict; save the model with envs.save_checkpoint, which writes its "
                "state_dict, or train it again with n2n teacher"
            ) from None
        raise ValueError(
            f"checkpoint {path} is damaged, truncated or not a PyTorch weights file "
            f"({type(err).__name__}); copy it again from where it was saved, or train a new "
            "teacher with n2n teacher"
        ) from None
