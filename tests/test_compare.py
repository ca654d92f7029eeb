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
    # The search weighed against every rival at both budgets (one seed each: no SE yet).
    margins = {(m["rival"], m["budget"]) for m in doc["margins"] if m["method"] == "n2n-ppo"}
    assert margins == {(r, b) for r in compare.RIVALS for b in budgets}
    assert f"n2n-ppo at <= {budgets[0]:,} against random" in table
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
    # --methods chooses what runs; the table still shows every finished cell in --out, so a
    # method added to a finished comparison does not wipe the others from its table.
    assert compare.main([*argv, "--report", "--methods", "slimming,kd-student"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["missing"] == ["kd-student/s0"]
    assert {s["method"] for s in doc["summary"]} == METHODS - {"kd-student"}


def _rows(method: str, budget: int, accuracies: list[float]) -> list[dict]:
    return [{"method": method, "seed": seed, "budget": budget, "params": budget,
             "nonzero_params": budget, "flops": 1, "val_accuracy": acc, "test_accuracy": acc,
             "delta_points": 0.0, "within": True, "kd_steps": 1, "teacher_forwards": 1,
             "wall_time_s": 1.0} for seed, acc in enumerate(accuracies)]  # fmt: skip


def test_margins_weigh_each_search_against_each_rival_in_standard_errors_of_the_difference():
    compare = _compare()
    rows = [*_rows("n2n-ppo", 100, [0.93, 0.92, 0.94]), *_rows("slimming", 100, [0.92] * 3),
            *_rows("structured-l1", 100, [0.90, 0.94, 0.95]), *_rows("kd-student", 100, [0.90]),
            *_rows("l1-unstructured", 100, [0.99]), *_rows("slimming", 50, [0.5] * 3)]  # fmt: skip
    margins = {
        (m["budget"], m["rival"]): m for m in compare.margins(compare.summarise(rows, 10000))
    }
    # Only searches are weighed, only against the rivals at their own budget; a sparse
    # (l1-unstructured) model is no rival for a dense one.
    assert set(margins) == {(100, "slimming"), (100, "structured-l1"), (100, "kd-student")}
    slim = margins[(100, "slimming")]
    assert slim["points"] == pytest.approx(1.0)
    assert slim["se"] == pytest.approx(100 * 0.01 / 3**0.5)  # n2n's spread alone
    assert slim["standard_errors"] == pytest.approx(3**0.5)
    structured = margins[(100, "structured-l1")]
    assert structured["points"] == pytest.approx(0.0, abs=1e-9)
    # Welch: both spreads, each over its own seeds (structured-l1's stdev is sqrt(0.0007)).
    assert structured["se"] == pytest.approx(100 * ((0.0001 + 0.0007) / 3) ** 0.5)
    assert margins[(100, "kd-student")]["se"] is None  # one seed: no spread to weigh it by
    text = compare.margin_lines(list(margins.values()))
    assert "n2n-ppo at <= 100 against slimming +1.00 points (+1.7 SE)" in text
    assert "kd-student +3.00 points (one seed)" in text


def test_targets_state_each_goal_beside_its_measurement() -> None:
    compare = _compare()
    rows = [*_rows("n2n-ppo", 100, [0.93, 0.92, 0.94]), *_rows("slimming", 100, [0.92] * 3),
            *_rows("random", 100, [0.95, 0.93, 0.94]), *_rows("n2n-ppo", 50, [0.9] * 3),
            *_rows("kd-student", 50, [0.8])]  # fmt: skip
    for r, delta, minutes in zip(rows[:3], (-0.4, -0.7, -0.5), (20, 31, 25), strict=True):
        r["delta_points"], r["wall_time_s"] = delta, 60 * minutes
    summary = compare.summarise(rows, 10000)
    goals = {
        (t["budget"], t["method"]): t for t in compare.targets(rows, summary, {100: 10.0, 50: 20.0})
    }
    assert set(goals) == {(100, "n2n-ppo"), (50, "n2n-ppo")}  # only searches have targets
    ten = goals[(100, "n2n-ppo")]
    # Mean delta -0.53 misses "within 0.5"; random (0.94 mean) is the hardest rival, 1 point
    # ahead, so "ahead of every rival" is missed; one seed took 31 minutes, over 30.
    assert ten["delta"] == pytest.approx(-1.6 / 3)
    assert (ten["within_met"], ten["ahead_met"], ten["time_met"]) == (False, False, False)
    assert ten["hardest_rival"]["rival"] == "random"
    assert ten["slowest_min"] == pytest.approx(31)
    twenty = goals[(50, "n2n-ppo")]
    assert (twenty["within_met"], twenty["ahead_met"], twenty["time_met"]) == (True, True, True)
    text = compare.target_lines(list(goals.values()))
    assert ("Targets, n2n-ppo at teacher/10 (3 seeds): mean within 0.5 points of the teacher: "
            "-0.53, missed; mean above every rival's: hardest random -1.00 points") in text  # fmt: skip
    assert "each search <= 30 min: slowest 31.0 min, missed." in text
    assert "hardest kd-student +10.00 points (one seed), met" in text
    # Seeds that agree on both sides leave no spread to weigh the margin by: said, not a crash.
    flat = [*_rows("n2n-ppo", 50, [0.9] * 3), *_rows("slimming", 50, [0.85] * 3)]
    text = compare.target_lines(compare.targets(flat, compare.summarise(flat, 10000), {50: 20.0}))
    assert "hardest slimming +5.00 points (no spread), met" in text


def test_the_variants_change_the_search_in_their_one_way(tmp_path) -> None:
    compare = _compare()
    cfg = compare.cell_config([], "demo", "n2n-ppo-sparse", 1, tmp_path / "t", tmp_path / "r", [])
    plain = compare.cell_config([], "demo", "n2n-ppo", 1, tmp_path / "t", tmp_path / "r", [])
    assert cfg.search.algo == plain.search.algo == "ppo"
    assert cfg.search.sparsity_steps == cfg.baseline.sparsity_steps > 0
    assert cfg.search.sparsity_l1 == cfg.baseline.sparsity_l1
    assert (cfg.shrinkage.importance, plain.shrinkage.importance) == ("bn", "l1")
    assert plain.search.sparsity_steps == 0
    fit = compare.cell_config([], "demo", "n2n-ppo-fit", 1, tmp_path / "t", tmp_path / "r", [])
    assert fit.removal.fit_budget and not plain.removal.fit_budget
    assert fit.search.algo == "ppo" and fit.search.sparsity_steps == 0
