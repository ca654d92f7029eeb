"""``benchmarks/compare.py --quick``: every method on one digits teacher, one table, one MLflow tree.

The benchmark is a script, not a test; this runs its cheap mode for real (Ray, RLlib, KD on
digits) and checks what it produces, not how fast.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
METHODS = {"n2n-ppo", "random", "structured-l1", "slimming", "kd-student", "l1-unstructured",
           "slimming-eq", "structured-l1-eq"}  # fmt: skip


def _compare():
    spec = importlib.util.spec_from_file_location("compare", REPO / "benchmarks" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_quick_compare_runs_every_method_at_both_budgets_and_logs_one_parent_run(
    ray_cluster, tmp_path
) -> None:
    from mlflow import MlflowClient

    out, uri = tmp_path / "compare", f"sqlite:///{tmp_path / 'mlflow.db'}"
    compare = _compare()
    argv = ["--quick", "--out", str(out), "--tracking-uri", uri]
    assert compare.main(argv) == 0

    doc = json.loads((out / "results.json").read_text())
    teacher, budgets = doc["teacher"], doc["budgets"]
    assert budgets == [teacher["params"] // 10, teacher["params"] // 20]
    summary = {(s["method"], s["budget"]): s for s in doc["summary"]}
    assert set(summary) == {(m, b) for m in METHODS for b in budgets}, sorted(summary)
    for s in summary.values():
        assert s["seeds"] == 1 and 0.2 < s["test_mean"] <= 1.0, s
        assert s["within"], s  # every student offered at a budget fits it
        assert s["kd_steps"] > 0 and s["teacher_forwards"] > 0, s
    rows = [r for r in doc["rows"] if not r.get("error")]
    for r in rows:
        assert r["delta_points"] == pytest.approx(
            100 * (r["test_accuracy"] - teacher["test_accuracy"])
        )
    # The search aimed at each budget: its student is within it, not merely small.
    for budget in budgets:
        (n2n,) = [r for r in rows if r["method"] == "n2n-ppo" and r["budget"] == budget]
        assert n2n["params"] <= budget
        # The equal-cost rows trained at least as many KD steps as that search.
        assert (
            summary[("slimming-eq", budget)]["kd_steps"] >= summary[("n2n-ppo", budget)]["kd_steps"]
        )
    sparse = [r for r in rows if r["method"] == "l1-unstructured"]
    assert all(r["params"] == teacher["params"] > r["nonzero_params"] for r in sparse)

    # The learning curves: per search, budget, seed and stage, the best reward after each
    # child and each iteration's mean, placed at the number of children evaluated by its end.
    assert {label.split(" ")[0] for label in doc["curves"]} == {"n2n-ppo", "random"}
    for runs in doc["curves"].values():
        for run in runs:
            assert set(run["stages"]) == {"removal", "shrinkage"}
            assert len(run["best"]) == sum(len(c["best"]) for c in run["stages"].values())
            for curve in run["stages"].values():
                xs = [x for x, _ in curve["iteration_means"]]
                assert xs == sorted(xs) and xs[-1] == len(curve["best"]), curve
                assert curve["best"] == sorted(curve["best"])  # best so far never falls
                assert max(y for _, y in curve["iteration_means"]) <= curve["best"][-1]

    table = (out / "table.md").read_text()
    assert table.startswith("| budget | method |") and "standard error" in table
    assert all(f"| {m}" in table for m in METHODS)
    for name in ("pareto.png", "curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("n2n-compare")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.data.tags["n2n.method"] for r in nested} == METHODS
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"table.md", "pareto.png", "curves.png", "results.json"} <= artifacts

    # A second invocation reuses every finished cell instead of training again.
    cells = sorted(out.glob("*/**/result.json"))
    before = {c: c.read_text() for c in cells}
    assert compare.main(argv) == 0
    assert {c: c.read_text() for c in cells} == before

    # --report builds the table from the finished cells alone, trains nothing, names the rest.
    shutil.rmtree(out / "kd-student")
    assert compare.main([*argv, "--report"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["missing"] == ["kd-student/s0"]
    assert "kd-student" not in {s["method"] for s in doc["summary"]}
    assert "Partial: 1 of 10 cells not run yet (kd-student/s0)." in (out / "table.md").read_text()
    assert not (out / "kd-student").exists()
