"""The environment variables every n2n process sets for Ray, Tune and MLflow (unless the user
set them), from the command line and from Python alike."""

from __future__ import annotations

import os

DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # n2n's progress lines replace Tune's status tables; per-iteration checkpoints are intended.
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    # Tune saves its experiment state after every event (it is small): a killed driver then
    # resumes from the iteration it last recorded instead of one replayed from an older state.
    "TUNE_GLOBAL_CHECKPOINT_S": "0",
}


def apply() -> None:
    """Sets each of :data:`DEFAULTS` that the environment does not set already."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)


def quiet_ray_loggers(verbose: bool = False) -> None:
    """Keeps Ray's own warnings off n2n's progress lines (``import ray`` resets these levels)."""
    import logging

    import ray  # noqa: F401 (sets the levels this then overrides)

    for noisy in ("ray.rllib", "ray.tune", "ray.train"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.ERROR)
