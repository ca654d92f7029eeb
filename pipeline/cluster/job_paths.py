"""Where a run's results go when ``n2n run`` runs as a Ray job, so that they outlive the job.

A Ray job (``ray job submit``, ``n2n submit``, a KubeRay RayJob) runs its entrypoint in a
working directory that dies with it: with ``--working-dir`` it is Ray's unpacked copy,
``<temp dir>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>/``, deleted with the
Ray session; on Kubernetes it is the head pod's filesystem, deleted with the RayCluster. A
relative path in the config (``runs/...``, ``sqlite:///mlflow.db``) lands there, and with it
the run directory, the MLflow store, the registered model and any chance of ``--resume``.

:func:`cluster_paths_problem` names such a path in one sentence with its fix; ``check_run``
refuses the run with it before any Ray work. One case is redirected instead of refused: a new
MLflow experiment in an absolute SQLite store would take its artifact root from the working
directory (MLflow's default ``./mlruns``), so it is created here with its artifacts in
``mlruns/`` beside the store, where a local ``n2n run`` keeps them too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pipeline.tracking.store import resolve_tracking_uri, sqlite_artifact_root, sqlite_path

logger = logging.getLogger(__name__)

JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor in a job's entrypoint process (measured with Ray 2.60; the
entrypoint has no ``RAY_JOB_ID``, which Ray sets in worker processes of any driver)."""
RAY_WORKING_DIR_COPIES = ("runtime_resources", "working_dir_files")
"""Path parts of Ray's unpacked ``working_dir`` copies inside its session directory."""


def in_ray_job(environ: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> bool:
    """Whether this process runs as (part of) a Ray job rather than from a user's shell."""
    environ = os.environ if environ is None else environ
    return bool(environ.get(JOB_ENV_VAR)) or in_ray_working_dir_copy(
        Path.cwd() if cwd is None else Path(cwd)
    )


def in_ray_working_dir_copy(path: str | Path) -> bool:
    """Whether ``path`` lies inside Ray's temporary copy of a job's ``working_dir``."""
    parts = Path(path).parts
    first, second = RAY_WORKING_DIR_COPIES
    return any(a == first and b == second for a, b in zip(parts, parts[1:], strict=False))


def cluster_paths_problem(
    cfg: Any,
    environ: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    *,
    in_job: bool | None = None,
) -> str | None:
    """Why this run's results would not outlive the Ray job it runs in, or None.

    Outside a Ray job (``in_job`` None detects it from ``environ`` and ``cwd``) nothing is
    checked. Inside one, a relative SQLite tracking URI, and a run directory, Tune storage or
    SQLite store inside Ray's temporary working-dir copy, are each a problem. When everything
    is in place and the experiment of an absolute SQLite store does not exist yet, it is
    created with its artifacts beside the store (see the module docstring).

    Args:
        cfg: the run's ``RunConfig``, with resolved paths.
        environ: environment to detect a Ray job from; default ``os.environ``.
        cwd: working directory of the run; default the current one.
        in_job: skip the detection (``n2n submit`` checks a config bound for a job).
    """
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else Path(cwd)
    if in_job is None:
        in_job = in_ray_job(environ, cwd)
    if not in_job:
        return None
    temp = in_ray_working_dir_copy(cwd)
    where = "Ray's temporary copy of the working dir" if temp else "the Ray job's working dir"
    for key, value, flag in (
        ("output.run_dir", cfg.output.run_dir, "--run-dir"),
        ("output.storage_path", cfg.output.storage_path, "--storage-path"),
    ):
        if value and "://" not in value and _doomed(Path(value), cwd, temp):
            return (
                f"{key} {value} lies in {where}, which is deleted with the job; pass "
                f"{flag} /absolute/path on storage that outlives it (a shared volume on a "
                f"cluster, e.g. {flag} $PWD/runs/NAME on a local head)"
            )
    if not cfg.tracking.enabled:
        return None
    uri = resolve_tracking_uri(cfg.tracking.uri, environ)
    path = sqlite_path(uri)
    if path is None or path == ":memory:":
        return None
    if not Path(path).is_absolute() or _doomed(Path(path), cwd, temp):
        return (
            f"tracking.uri {uri} puts the MLflow store (runs, registered model) in {where}, "
            "which is deleted with the job; pass --tracking-uri sqlite:////absolute/path/mlflow.db "
            "on storage that outlives it, or an MLflow server (--tracking-uri http://HOST:5000)"
        )
    return _place_sqlite_experiment(path, cfg.tracking.experiment, cwd, temp)


def _doomed(path: Path, cwd: Path, temp: bool) -> bool:
    """Whether ``path`` dies with the job: relative to it, or inside Ray's working-dir copy."""
    if not path.is_absolute():
        return True
    if in_ray_working_dir_copy(path):
        return True
    return temp and path.resolve().is_relative_to(cwd.resolve())


def _place_sqlite_experiment(db: str, experiment: str, cwd: Path, temp: bool) -> str | None:
    """Checks (or creates) the experiment's artifact root so the model outlives the job."""
    location = _artifact_location(db, experiment)
    if location is not None:
        local = _local_path(location)
        if local is not None and _doomed(local, cwd, temp):
            return (
                f"MLflow experiment {experiment!r} in sqlite:///{db} keeps its artifacts in "
                f"{location}, which is deleted with the job, so the registered model would be "
                "lost; choose another --set tracking.experiment=NAME"
            )
        return None
    if not Path(db).parent.is_dir():
        return None  # Tracker.check_reachable names the missing folder
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    try:
        client.create_experiment(experiment, artifact_location=sqlite_artifact_root(db, experiment))
        logger.info("created MLflow experiment %r with artifacts beside %s", experiment, db)
    except MlflowException as err:  # created at the same moment by another run
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return None


def _local_path(location: str) -> Path | None:
    """The local folder of an artifact location, or None for a remote one (s3:, mlflow-artifacts:)."""
    parts = urlsplit(location)
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    return Path(location) if not parts.scheme else None


def _artifact_location(db: str, experiment: str) -> str | None:
    """The artifact location of ``experiment`` in a SQLite store, read without writing to it."""
    if not Path(db).is_file():
        return None
    try:
        uri = f"{Path(db).resolve().as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
            row = conn.execute(
                "SELECT artifact_location FROM experiments WHERE name = ?", (experiment,)
            ).fetchone()
    except sqlite3.Error:  # not an MLflow store yet (or locked): MLflow will say so
        return None
    return row[0] if row else None
