"""``n2n baseline METHOD`` end to end on digits: real pruning, real KD on a local Ray cluster.

Each classic method runs through the command line on one small trained teacher, and each is
checked for what its method says it does (the pruned share of weights, the budget, the
records and checkpoints), not only that it ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from envs.checkpoint import load_checkpoint
from pipeline.baselines.unstructured import sparsity
from pipeline.torch_utils import evaluate_accuracy
from pipeline.tracking.rundir import RunDir

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def teacher_dir(digits_teacher_dir) -> Path:
    return digits_teacher_dir


def _baseline(ray_cluster, teacher_dir: Path, run_dir: Path, method: str, *extra: str) -> dict:
    from pipeline.cli.main import main

    address = ray_cluster.get_runtime_context().gcs_address
    argv = [
        "baseline", method, "--run-dir", str(run_dir), "--address", address, "--quiet",
        "--set", f"teacher.checkpoint={teacher_dir}", "--set", "finetune.steps=40",
        "--set", "distill.steps=20", "--set", "finetune.lr=0.05", *extra,
    ]  # fmt: skip
    if "--tracking-uri" not in extra:
        argv.append("--no-tracking")
    assert main(argv) == 0
    return RunDir(run_dir).summary()


def _check_records(summary: dict, run_dir: Path, digits) -> list[dict]:
    """Every record is complete, and its checkpoint reloads to the accuracy it reports."""
    teacher = summary["teacher"]
    records = summary["records"]
    assert records and all(not r["error"] for r in records), records
    for r in records:
        assert r["params"] <= teacher["params"] and r["nonzero_params"] <= r["params"]
        assert r["compression"] == pytest.approx(teacher["params"] / r["params"])
        assert r["delta"] == pytest.approx(r["test_accuracy"] - teacher["test_accuracy"])
        assert r["child_evaluations"] >= 1 and r["wall_time_s"] > 0
        reloaded = load_checkpoint(run_dir / "students" / str(r["index"]), num_classes=10)
        assert evaluate_accuracy(reloaded.model, *digits.test) == pytest.approx(
            r["test_accuracy"], abs=1e-9
        )
        assert sparsity(reloaded.model)["nonzero_params"] == r["nonzero_params"]
    assert summary["student"] == max(records, key=lambda r: r["reward"])
    assert summary["child_evaluations"] == sum(r["child_evaluations"] for r in records) or (
        summary["method"] == "slimming"  # the sparsity training is shared by every budget
    )
    assert (run_dir / "students.csv").is_file() and (run_dir / "config.yaml").is_file()
    return records


def test_l1_unstructured_zeroes_the_requested_share_and_says_the_model_is_not_smaller(
    ray_cluster, teacher_dir, digits, tmp_path
) -> None:
    run_dir = tmp_path / "l1"
    summary = _baseline(
        ray_cluster, teacher_dir, run_dir, "l1-unstructured", "--set", "baseline.amounts=[0.3,0.8]"
    )
    records = _check_records(summary, run_dir, digits)
    assert [r["amount"] for r in records] == [0.3, 0.8]
    for r in records:
        model = load_checkpoint(run_dir / "students" / str(r["index"]), num_classes=10).model
        counts = sparsity(model)
        # Fine-tuning kept the masks: the zeroed share is still the requested amount.
        assert counts["sparsity"] == pytest.approx(r["amount"], abs=1.0 / counts["prunable"] + 1e-3)
        assert r["params"] == summary["teacher"]["params"] and r["compression"] == 1.0
        assert r["sparse_compression"] > 1.0 and "dense model" in r["note"]
        assert r["flops"] == summary["teacher"]["flops"]


@pytest.mark.parametrize("method", ["structured-l1", "slimming", "kd-student"])
def test_budgeted_methods_meet_each_parameter_budget(
    ray_cluster, teacher_dir, digits, tmp_path, method
) -> None:
    run_dir = tmp_path / method
    teacher_params = json.loads((teacher_dir / "metrics.json").read_text())["params"]
    budgets = [teacher_params // 3, teacher_params // 8]
    extra = ["--set", "baseline.compression=[]", "--params", str(budgets[0]),
             "--params", str(budgets[1]), "--set", "baseline.sparsity_steps=10"]  # fmt: skip
    summary = _baseline(ray_cluster, teacher_dir, run_dir, method, *extra)
    records = _check_records(summary, run_dir, digits)
    assert sorted(r["target_params"] for r in records) == sorted(budgets)
    for r in records:
        assert r["params"] <= r["target_params"], r
        assert r["params"] >= 0.5 * r["target_params"], r  # close to the budget, not far below
        # Trained (chance is 0.1); a net trained from scratch for 40 steps is far from done.
        assert r["test_accuracy"] > (0.2 if method == "kd-student" else 0.3), r
    if method == "slimming":
        assert all(r["rounds"] >= 1 for r in records)
        assert max(r["rounds"] for r in records) >= 2  # 8x needs several halving rounds


def test_a_baseline_is_tracked_in_mlflow_without_registering(
    ray_cluster, teacher_dir, digits, tmp_path
) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = _baseline(
        ray_cluster, teacher_dir, tmp_path / "kd", "kd-student", "--tracking-uri", uri,
        "--set", "baseline.compression=[4]", "--set", "tracking.experiment=baselines",
    )  # fmt: skip
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("baselines")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["n2n.method"] == "kd-student"
    assert run.data.metrics["student/params"] == summary["records"][0]["params"]
    assert run.data.metrics["student/accuracy"] == pytest.approx(
        summary["records"][0]["test_accuracy"]
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "summary.json", "plots", "run"} <= artifacts
    assert client.search_registered_models() == []  # registers nothing unless asked


def test_an_unknown_method_exits_2_before_any_work(capsys) -> None:
    from pipeline.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["baseline", "magnitude"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'magnitude'" in capsys.readouterr().err
