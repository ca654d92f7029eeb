"""What ``n2n submit`` hands a Ray job: the ``python -m pipeline run ...`` command line it runs,
a name for it, and the one-line notes and errors of the submission.

Both targets (Ray's job server and a KubeRay RayJob) build their entrypoint with
:func:`run_command`, so the nested command is written in one place.
"""

from __future__ import annotations

import re
import secrets
import sys
import time
from collections.abc import Sequence

from pipeline.config.schema import RunConfig


class SubmitError(ValueError):
    """Bad input found before anything was submitted; exit code 2."""


def note(text: str) -> None:
    """One status line of ``n2n submit`` on stderr (the job's own logs go to stdout)."""
    print(f"n2n submit: {text}", file=sys.stderr, flush=True)


def job_name(cfg: RunConfig, now: float | None = None) -> str:
    """A readable, unique job name: ``n2n-<config name>-<MMDD-HHMMSS>-<4 hex>``."""
    slug = re.sub(r"[^a-z0-9]+", "-", cfg.name.lower()).strip("-")[:20].strip("-") or "run"
    stamp = time.strftime("%m%d-%H%M%S", time.localtime(now))
    return f"n2n-{slug}-{stamp}-{secrets.token_hex(2)}"


def tracking_flags(enabled: bool, uri: str | None) -> list[str]:
    """``--tracking-uri URI``, ``--no-tracking``, or nothing (keep the run's own setting)."""
    if not enabled:
        return ["--no-tracking"]
    return ["--tracking-uri", uri] if uri else []


def run_command(
    run_dir: str,
    *,
    resume: bool = False,
    preset: str | None = None,
    flags: Sequence[str] = (),
    tracking: Sequence[str] = (),
    verbose: bool = False,
    quiet: bool = False,
) -> list[str]:
    """The argv of ``n2n run`` inside a job, joining the job's own cluster (``--address auto``).

    Args:
        run_dir: the run directory, an absolute path that outlives the job.
        resume: continue the run in ``run_dir`` (its ``config.yaml`` says what it searches).
        preset: the preset name or config file a new run starts from.
        flags: the run's other flags (``--set`` overrides and flags passed on as given).
        tracking: the tracking flags (see :func:`tracking_flags`).
        verbose, quiet: ``n2n -v`` and ``--quiet``.
    """
    argv = ["python", "-m", "pipeline", *(["-v"] if verbose else []), "run"]
    if resume:
        argv += ["--resume", run_dir]
    else:
        argv += [*(["--preset", preset] if preset else []), *flags, "--run-dir", run_dir]
    return [*argv, *tracking, *(["--quiet"] if quiet else []), "--address", "auto"]
