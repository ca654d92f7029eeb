"""Where a run's MLflow records go: the tracking URI a run resolves to, and SQLite stores.

Kept apart from the tracker (``pipeline.tracking.tracker``), which imports MLflow, so that the
checks made at the door (``pipeline.cluster``) resolve the same store without loading it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
"""MLflow 3's default store: a SQLite file in the working directory, no server needed."""


def resolve_tracking_uri(uri: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """``uri`` (``--tracking-uri``), else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``.

    Here rather than in ``pipeline.tracking.tracker`` so that checks made before MLflow is
    imported resolve the store the run will use.
    """
    environ = os.environ if environ is None else environ
    return uri or environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_path(uri: str) -> str | None:
    """The file path of a ``sqlite:///`` URI (relative or absolute), or None for other URIs."""
    parts = urlsplit(uri)
    if parts.scheme != "sqlite":
        return None
    path = unquote(uri.split("://", 1)[1]).removeprefix("/")  # sqlite:///a -> a, ////a -> /a
    return path.split("?", 1)[0] or None


def absolute_sqlite_uri(uri: str, base: str | Path) -> str:
    """``uri`` with a relative SQLite path made absolute against ``base``; other URIs as they are."""
    path = sqlite_path(uri)
    if path is None or path == ":memory:" or Path(path).is_absolute():
        return uri
    return f"sqlite:///{(Path(base) / path).resolve()}"


def sqlite_artifact_root(db_path: str | Path, experiment: str) -> str:
    """Where a new experiment of a SQLite store keeps its artifacts: ``mlruns/`` beside it."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", experiment).strip("-") or "experiment"
    return (Path(db_path).resolve().parent / "mlruns" / slug).as_uri()
