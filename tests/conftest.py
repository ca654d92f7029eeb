"""Shared fixtures: one real local Ray cluster per test session, quiet and small."""

from __future__ import annotations

import os

import pytest

# Local throwaway clusters only: no token auth, no telemetry (see PLATFORM_NOTES.md).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with 2 CPUs and a capped object store, shared by the session."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            object_store_memory=512 * 1024**2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()
