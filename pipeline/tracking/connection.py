"""Reaching MLflow: the checks made before a run starts, its experiment, and the UI's address."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import mlflow
import requests
from mlflow.exceptions import MlflowException

from pipeline.tracking.store import DEFAULT_TRACKING_URI, sqlite_path

EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""Marks the experiment as model training rather than GenAI in MLflow's own records."""
UI_VIEW = "workflowType=machine_learning"
"""MLflow 3.17's UI picks its view from this query parameter and opens on its GenAI view
without it (the experiment tag above does not switch it): every address n2n gives has it."""
LOCAL_UI = "http://127.0.0.1:5000"
"""Where ``mlflow ui`` serves a local store by default."""
UNREACHABLE_FIX = (
    "start the server, pass another --tracking-uri (or MLFLOW_TRACKING_URI), or leave "
    f"both unset to log to {DEFAULT_TRACKING_URI} in the working directory"
)


def check_store(uri: str, safe_uri: str) -> None:
    """Fails unless the store can answer: a server's ``/health``, a SQLite file's folder.

    Raises:
        ValueError: one sentence naming the URI (``safe_uri``, without secrets) and the fix.
    """
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        try:
            status = requests.get(f"{uri.rstrip('/')}/health", timeout=5).status_code
        except requests.RequestException as err:
            raise ValueError(
                f"MLflow tracking server {safe_uri} is unreachable "
                f"({type(err).__name__}); {UNREACHABLE_FIX}"
            ) from None
        if status >= 500:
            raise ValueError(
                f"MLflow at {safe_uri} answers /health with {status}; {UNREACHABLE_FIX}"
            )
    elif scheme == "sqlite":
        path = sqlite_path(uri)
        folder = Path(path or ".").expanduser().resolve().parent
        if path not in (None, ":memory:") and not folder.is_dir():
            raise ValueError(
                f"MLflow store {safe_uri} lies in {folder}, which does not exist; "
                "create the folder or pass another --tracking-uri"
            )


def ensure_experiment(client: mlflow.MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created (as model training) when missing."""
    found = client.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage == "deleted":
        raise ValueError(
            f"MLflow experiment {name!r} is deleted; restore it "
            "(mlflow experiments restore) or choose another tracking.experiment"
        )
    if found is not None:
        if EXPERIMENT_KIND[0] not in found.tags:
            client.set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
        return found.experiment_id
    try:
        return client.create_experiment(name, tags=dict([EXPERIMENT_KIND]))
    except MlflowException as err:  # created at the same moment by another run
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def ui_url(server: str | None, experiment_id: str | None, run_id: str | None = None) -> str | None:
    """The MLflow UI page of an experiment (or one of its runs) on the model-training view.

    ``server`` is the tracking server's address (without secrets); None when there is no
    experiment yet or the store is not a server.
    """
    if not server or urlsplit(server).scheme not in ("http", "https") or experiment_id is None:
        return None
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{server.rstrip('/')}/{page}?{UI_VIEW}"
