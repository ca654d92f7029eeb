"""``benchmarks/compare.py --quick``: every method on one digits teacher, one table, one MLflow tree.

The benchmark is a script, not a test; this runs its cheap mode for real (Ray, RLlib, KD on
digits) and checks what it produces, not how fast.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
METHODS = {"n2n-ppo", "n2n-appo", "random", "structured-l1", "slimming", "kd-student",
           "l1-unstructured"}  # fmt: skip


def _compare():
    spec = importlib.util.spec_from_file_location("compare", REPO / "benchmarks" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_compare_runs_every_method_and_logs_one_parent_run(ray_cluster, tmp_path) -> None:
    from mlflow import MlflowClient

    out, uri = tmp_path / "compare", f"sqlite:///{tmp_path / 'mlflow.db'}"
    compare = _compare()
    assert compare.main(["--quick", "--out", str(out), "--tracking-uri", uri]) == 0

    doc = json.loads((out / "results.json").read_text())
    rows = doc["rows"]
    assert {r["method"] for r in rows} == METHODS and not [r for r in rows if r.get("error")]
    teacher = doc["teacher"]
    for r in rows:
        assert r["params"] <= teacher["params"] and r["test_accuracy"] > 0.2, r
        assert r["delta_points"] == pytest.approx(
            100 * (r["test_accuracy"] - teacher["test_accuracy"])
        )
    # The budgeted baselines ran at the N2N (PPO) student's size and at 10x and 20x.
    n2n = next(r for r in rows if r["method"] == "n2n-ppo")
    budgets = {n2n["params"], teacher["params"] // 10, teacher["params"] // 20}
    for method in ("structured-l1", "slimming", "kd-student"):
        mine = [r for r in rows if r["method"] == method]
        assert len(mine) == len(budgets), mine
        targets = sorted(budgets, reverse=True)
        assert all(r["params"] <= t for r, t in zip(mine, targets, strict=True)), mine
    sweep = [r for r in rows if r["method"] == "l1-unstructured"]
    assert len(sweep) == 2 and all(r["params"] == teacher["params"] for r in sweep)
    assert all(r["nonzero_params"] < r["params"] for r in sweep)
    # One search student each for the searches, with its child budget.
    for method in ("n2n-ppo", "n2n-appo", "random"):
        (row,) = [r for r in rows if r["method"] == method]
        assert row["child_evaluations"] == 12, row  # 2 x 3 children per stage, two stages

    table = (out / "table.md").read_text()
    assert all(f"| {m} |" in table for m in METHODS) and table.startswith("| method |")
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("n2n-compare")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.data.tags["n2n.method"] for r in children} == METHODS
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"table.md", "pareto.png", "results.json"} <= artifacts

    # A second invocation reuses every finished method instead of training again.
    before = {m: json.loads((out / m / "result.json").read_text()) for m in METHODS}
    assert compare.main(["--quick", "--out", str(out), "--tracking-uri", uri]) == 0
    after = {m: json.loads((out / m / "result.json").read_text()) for m in METHODS}
    assert after == before
