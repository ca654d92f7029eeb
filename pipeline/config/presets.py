"""Presets and overrides: a run's config loaded from a YAML preset, ``--set key=value``
overrides applied, and validated once into a :class:`~pipeline.config.schema.RunConfig`.

Presets live in ``configs/<name>.yaml`` (``demo`` is the default); any key can be overridden
with dotted ``key=value`` pairs whose values are parsed as YAML (``removal.iterations=3``,
``shrinkage.ratios=[0.25,0.5,1.0]``). Every error is a :class:`ConfigError` of one line naming
the key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.config.schema import ConfigError, RunConfig

DEFAULT_PRESET = "demo"
PACKAGE_DIR = Path(__file__).resolve().parent.parent
PRESET_DIRS = (PACKAGE_DIR.parent / "configs", PACKAGE_DIR / "presets")
"""Where preset names are looked up: the repository's ``configs/``, then packaged presets."""


def presets() -> dict[str, Path]:
    """Preset names -> files, from every preset directory (earlier directories win)."""
    found: dict[str, Path] = {}
    for folder in PRESET_DIRS:
        if folder.is_dir():
            for path in sorted(folder.glob("*.yaml")):
                found.setdefault(path.stem, path)
    return found


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"config {path}{where} is not valid YAML: {getattr(err, 'problem', err)}"
        ) from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def read_preset(preset: str | Path) -> dict[str, Any]:
    """The raw mapping of a preset name or a YAML file path."""
    path = Path(preset).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return _read_yaml(path)
    known = presets()
    if str(preset) not in known:
        raise ConfigError(
            f"unknown preset {str(preset)!r}: use one of {sorted(known)} or a path to a YAML file"
        )
    return _read_yaml(known[str(preset)])


def parse_override(text: str) -> tuple[list[str], Any]:
    """Splits ``"a.b=value"`` into ``(["a", "b"], value)``, the value parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"override {text!r} must look like section.key=value, e.g. removal.iterations=3"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(
            f"override {text!r}: value is not valid YAML ({getattr(err, 'problem', err)})"
        ) from err
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Returns a copy of ``raw`` with dotted ``key=value`` overrides set (validated later)."""
    out = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {text!r}: {'.'.join(parts[: depth + 1])} is not a section"
                )
            node = child
        node[parts[-1]] = value
    return out


def _error_line(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"] if p != "[key]")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        line = f"config key {key!r} is unknown: check its spelling (n2n run --help lists the common flags)"
    elif not key:
        line = f"config: {message}"
    else:
        got = repr(first.get("input"))
        line = f"config key {key!r}: {message} (got {got if len(got) <= 60 else got[:57] + '...'})"
    more = len(err.errors()) - 1
    return line + (f" (and {more} more error{'s' if more > 1 else ''})" if more else "")


def validate_config(raw: dict[str, Any]) -> RunConfig:
    """Validates a raw mapping; raises :class:`ConfigError` with one line naming the key."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_error_line(err)) from None


def load_config(
    preset: str | Path = DEFAULT_PRESET, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Loads a preset name or YAML file, applies dotted overrides and validates the result.

    Raises:
        ConfigError: unknown preset or file, invalid YAML, unknown key, wrong type, value out
            of range; the message is one line naming the key.
    """
    return validate_config(apply_overrides(read_preset(preset), overrides))
