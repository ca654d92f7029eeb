"""Checks made at the door, before Ray or MLflow start and before the run directory exists.

A run refused here leaves nothing behind: no run directory, no MLflow run, no Ray session.
Each check raises :class:`PreflightError` (a ``ValueError``, exit code 2 in the CLI) with one
sentence naming the bad value and the fix.
"""

from __future__ import annotations

import errno
import importlib
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.cluster.job_paths import cluster_paths_problem
from pipeline.config.schema import RunConfig

ADDRESS_WAIT_S = 10.0
"""How long an unreachable ``ray.address`` is retried (a head that is still starting)."""


class PreflightError(ValueError):
    """Bad input found before any expensive work; exit code 2."""


def check_run(cfg: RunConfig, resume: bool) -> None:
    """Everything about a run that can fail before the data is loaded and Ray starts."""
    run_dir = Path(cfg.output.run_dir or "")
    if not resume and run_dir.is_dir() and any(run_dir.iterdir()):
        raise PreflightError(
            f"run directory {run_dir} already holds a run; continue it with --resume {run_dir} "
            "or choose another --run-dir"
        )
    check_writable(run_dir, "run directory", "--run-dir")
    storage = cfg.output.storage_path or ""
    if storage and "://" not in storage:
        check_writable(storage, "Tune storage", "--storage-path")
    if cfg.teacher.checkpoint is not None:
        folder = Path(cfg.teacher.checkpoint)
        if not ((folder / "spec.json").is_file() and (folder / "weights.pt").is_file()):
            raise PreflightError(
                f"teacher.checkpoint {folder} is not a checkpoint folder (spec.json + weights.pt); "
                "train one with n2n teacher"
            )
    module, _, attr = cfg.search.evaluator.partition(":")
    try:
        getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        raise PreflightError(
            f"search.evaluator {cfg.search.evaluator!r} cannot be imported; use 'package.module:Class'"
        ) from None
    # Here, not at the top: RLlib takes seconds to import (see check_teacher).
    from pipeline.search.transfer import check_transfer

    check_transfer(cfg)  # a policy that cannot start this run's search
    check_address(cfg.ray.address)
    if problem := cluster_paths_problem(cfg):  # inside a Ray job: results must outlive it
        raise PreflightError(problem)


def check_address(address: str | None, wait_s: float = ADDRESS_WAIT_S) -> None:
    """Fails unless ``address`` (``ray.address``) accepts a TCP connection within ``wait_s``.

    ``auto`` is resolved like Ray does: ``RAY_ADDRESS``, else the cluster that ``ray start``
    last started on this machine. ``ray://host:port`` (Ray Client) and ``host:port`` (the GCS)
    are both checked at their port.
    """
    if not address:
        return
    target = address
    if address == "auto":
        target = os.environ.get("RAY_ADDRESS") or _current_cluster() or ""
        if not target:
            raise PreflightError(
                "ray.address is 'auto' but no Ray cluster runs on this machine; start one with "
                "'ray start --head' or pass its address, e.g. --address 10.0.0.5:6379"
            )
    host, port = _host_port(target)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(3.0, wait_s) or 0.1):
                return
        except OSError as err:
            why = err.strerror or type(err).__name__
            if time.monotonic() >= deadline:
                raise PreflightError(
                    f"ray.address {address} cannot be reached ({why.lower()} at {host}:{port} "
                    f"for {wait_s:g} s); start the cluster (ray start --head) or fix --address"
                ) from None
            time.sleep(0.5)


def _host_port(address: str) -> tuple[str, int]:
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise PreflightError(
            f"ray.address {address!r} is not host:port; pass e.g. --address 10.0.0.5:6379, "
            "ray://10.0.0.5:10001 or auto"
        )
    return parts.hostname, port


def _current_cluster() -> str | None:
    """The address ``ray start --head`` left in ``<temp dir>/ray/ray_current_cluster``."""
    root = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"
    try:
        return (root / "ray_current_cluster").read_text().strip() or None
    except OSError:
        return None


def check_writable(path: str | Path, what: str, flag: str) -> None:
    """Fails unless ``path`` exists as a writable folder or can be created as one.

    Nothing is created: the nearest existing ancestor is probed with a temporary file.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PreflightError(f"{what} {path} is a file, not a folder; choose another {flag}")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise PreflightError(
            f"{what} {path} cannot be created because {existing} is a file; choose another {flag}"
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        why = os.strerror(err.errno) if err.errno else type(err).__name__
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            why = f"{existing} is not writable ({why.lower()})"
        raise PreflightError(
            f"{what} {path} cannot be written: {why}; choose another {flag}"
        ) from None


def check_teacher(cfg: Any, splits: Any) -> None:
    """Fails unless the teacher can be had: a checkpoint that loads and fits the data, or a
    builder (zoo name or import path) that builds a model for the data.

    On resume the run's own ``teacher/`` is the checkpoint when the config names none.
    """
    # Here, not at the top: PyTorch takes seconds to import, and n2n --help and refused
    # command lines (which import this module) should not wait for it.
    from pipeline.data.teachers import load_teacher

    checkpoint = cfg.teacher.checkpoint
    own = Path(cfg.output.run_dir or ".") / "teacher"
    if checkpoint is None and (own / "weights.pt").is_file():
        checkpoint = str(own)
    if checkpoint is not None:
        try:
            load_teacher(checkpoint, splits)
        except ValueError:
            raise
        except Exception as err:  # a spec.json that parses but describes no model, ...
            raise PreflightError(
                f"teacher.checkpoint {checkpoint} cannot be loaded ({type(err).__name__}: "
                f"{_first_line(err)}); train a new one with n2n teacher"
            ) from None
        return
    from envs.builders import build_model
    from pipeline.data.teachers import teacher_base_spec

    try:
        build_model(teacher_base_spec(cfg.teacher.arch_spec(), splits))
    except ValueError:
        raise
    except Exception as err:  # a builder that fails for these data
        raise PreflightError(
            f"teacher.arch {cfg.teacher.arch!r} cannot build a model for {splits.name} "
            f"({type(err).__name__}: {_first_line(err)}); check its kwargs (teacher.kwargs)"
        ) from None


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__
