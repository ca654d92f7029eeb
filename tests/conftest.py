"""Shared fixtures: one real local Ray cluster per test session, quiet and small; digits and a
small teacher trained on them once per session."""

from __future__ import annotations

import os
import tempfile

import pytest

# Local throwaway clusters only: no token auth, no telemetry (see PLATFORM_NOTES.md).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Teacher logits kept on disk across runs (pipeline/children/payload.py): a test session
# starts with an empty cache of its own, never the machine's ~/.cache/n2n.
os.environ.setdefault("N2N_CACHE_DIR", tempfile.mkdtemp(prefix="n2n-test-cache-"))


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with 2 CPUs and a capped object store, shared by the session."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never one that `ray start` left on this machine
            num_cpus=2,
            object_store_memory=512 * 1024**2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits split as the demo preset splits them (20% validation, seed 0), so
    that numbers measured here match what ``n2n`` commands on the demo config report."""
    from pipeline.data.datasets import load_dataset

    return load_dataset("digits", val_fraction=0.2, seed=0)


@pytest.fixture(scope="session")
def digits_teacher_dir(tmp_path_factory):
    """A small_cnn (width 0.5) teacher trained 8 epochs on digits, as a checkpoint folder.

    It loads its own copy of the data: test modules may override ``digits`` with their split.
    """
    import torch

    from pipeline.data.datasets import load_dataset
    from pipeline.data.teachers import TeacherTraining, train_teacher

    digits = load_dataset("digits", val_fraction=0.2, seed=0)

    out = tmp_path_factory.mktemp("digits-teacher")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores shared with Ray workers
    try:
        train_teacher(
            {"arch": "small_cnn", "kwargs": {"width": 0.5}}, digits, TeacherTraining(epochs=8),
            out_dir=out,
        )  # fmt: skip
    finally:
        torch.set_num_threads(before)
    return out
