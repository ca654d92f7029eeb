"""Student specs, canonical architecture hashes and checkpoints.

A *student spec* says how to rebuild a network from scratch, without pickling a module::

    {"format": "n2n-student/1",
     "base": {"arch": "resnet18", "kwargs": {...}, "input_shape": [3, 32, 32]},
     # "base" may also hold "adapt": {"features.0.0": {"in_channels": 1}} (envs.builders.fit_arch)
     "removed": ["layer1.1", "layer3.1"],            # units removed, by module path
     "channels": {"conv1": 16, "layer1.0.conv1": 8}}  # output channels per coupled group

``channels`` is keyed by the first layer of each coupled channel group (see
``envs.surgery``) and lists every group, so two specs that build the same network are equal
after canonicalisation and share one :func:`arch_hash`. A teacher is a spec with nothing
removed and its own channel counts. A checkpoint is a folder holding ``spec.json`` and
``weights.pt`` (a ``state_dict``), plus ``metrics.json`` when known (``envs.checkpoint``).
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

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
