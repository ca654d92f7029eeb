"""Policy transfer on digits: a policy learned on one teacher starts the search on another."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.cli.main import main
from pipeline.search.transfer import TransferError, load_policy, policy_checkpoint
from pipeline.tracking.rundir import RunDir


def _flags(run_dir: Path, uri: str, *extra: str) -> list[str]:
    return [
        "run", "--run-dir", str(run_dir), "--quiet", "--tracking-uri", uri, "--episodes", "3",
        "--iterations", "2", "--set", "teacher.epochs=2", "--set", "distill.steps=15",
        "--set", "finetune.steps=20", "--set", "finetune.top_k=1",
        "--set", "tracking.experiment=transfer", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def source(ray_cluster, tmp_path_factory) -> tuple[Path, str]:
    """A finished run on the demo's small CNN: the policies to transfer."""
    tmp = tmp_path_factory.mktemp("source")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    address = ray_cluster.get_runtime_context().gcs_address
    assert main(_flags(tmp / "run", uri, "--address", address)) == 0
    return tmp / "run", uri


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_policy_moves_to_a_teacher_with_other_units_and_the_run_says_where_from(
    ray_cluster, source, tmp_path: Path
):
    from mlflow import MlflowClient

    run_dir, uri = source
    target = tmp_path / "target"
    address = ray_cluster.get_runtime_context().gcs_address
    code = main(_flags(target, uri, "--address", address, "--policy-from", str(run_dir),
                       "--freeze-policy", "--set", "teacher.arch=resnet34",
                       "--set", "teacher.width=0.125"))  # fmt: skip
    assert code == 0
    # Another teacher: other units, so other action lengths.
    width = lambda rows: {len(r["action"]) for r in rows}  # noqa: E731
    assert width(RunDir(target).children("removal")) != width(RunDir(run_dir).children("removal"))
    # Frozen: each stage's policy is still, tensor for tensor, the one it started from.
    for stage in ("removal", "shrinkage"):
        moved, started = (
            load_policy(policy_checkpoint(target, stage)),
            load_policy(policy_checkpoint(run_dir, stage)),
        )
        assert moved.keys() == started.keys()
        assert all(torch.equal(moved[k], started[k]) for k in moved), stage
    # The run records where its policy came from, in summary.json and in MLflow.
    source_run = json.loads((run_dir / "state.json").read_text())["mlflow"]["run_id"]
    summary = RunDir(target).summary()
    assert summary["policy_from"] == {"run_dir": str(run_dir.resolve()),
                                      "mlflow_run_id": source_run, "frozen": True}  # fmt: skip
    target_run = json.loads((target / "state.json").read_text())["mlflow"]["run_id"]
    tags = MlflowClient(tracking_uri=uri).get_run(target_run).data.tags
    assert tags["n2n.policy_from"] == str(run_dir.resolve())
    assert tags["n2n.policy_from_run"] == source_run and tags["n2n.policy_frozen"] == "true"


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_policy_of_another_shape_exits_2_with_one_line_before_ray(source, tmp_path, capsys):
    run_dir, uri = source
    code = main(_flags(tmp_path / "other", uri, "--policy-from", str(run_dir),
                       "--set", "search.hidden=16"))  # fmt: skip
    assert code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "removal policy has" in err[0] and "search.hidden (16 here)" in err[0]
    assert not (tmp_path / "other").exists()  # refused before anything was written


def test_what_cannot_be_transferred_is_named(tmp_path: Path, capsys):
    with pytest.raises(TransferError, match="no config.yaml there"):
        policy_checkpoint(tmp_path, "removal")
    assert main(["run", "--freeze-policy", "--run-dir", str(tmp_path / "r"), "--no-tracking"]) == 2
    assert "needs search.policy_from" in capsys.readouterr().err
