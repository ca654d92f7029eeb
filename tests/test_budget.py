"""Budget-first runs: ``n2n run --params N`` aims at the budget, chooses its student within it
by validation accuracy, and says plainly when no child fits (exit 5, run directory kept)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from envs.checkpoint import load_checkpoint
from envs.costs import count_params
from envs.rewards import BudgetReward, ChildScore, make_reward
from pipeline.cli.main import main
from pipeline.config.errors import NoFeasibleStudent
from pipeline.config.exits import Exit
from pipeline.config.presets import load_config
from pipeline.job.finetune import choose_best, top_candidates, within
from pipeline.tracking.rundir import RunDir
from pipeline.tracking.tables import budget_line


def _row(arch: str, params: int, accuracy: float, reward: float, flops: int = 1000) -> dict:
    return {"arch_hash": arch, "params": params, "flops": flops, "accuracy": accuracy,
            "reward": reward, "error": None}  # fmt: skip


# --------------------------------------------------------------------------- pure parts


def test_the_budget_reward_ranks_fitting_children_by_accuracy_alone():
    reward = BudgetReward({"params": 0.1}, softness=2.0, penalty=0.1)
    score = lambda acc, params: reward(ChildScore(acc, 0.9, params=params, teacher_params=1000))  # noqa: E731
    assert score(0.9, 100) == pytest.approx(1.0)  # at the budget: accuracy only
    assert score(0.9, 10) == pytest.approx(1.0)  # far below it: no bonus for shrinking further
    assert score(0.85, 100) < score(0.86, 50)  # within budget, the more accurate wins
    # Just over budget scores below a fitting child of equal accuracy, by at least the penalty.
    assert score(0.9, 101) < score(0.9, 100) - 0.1
    assert score(0.9, 200) == pytest.approx(1.0 * 0.5**2 - 0.1)
    assert score(0.9, 400) < score(0.9, 200)  # and the further over, the lower
    with pytest.raises(ValueError, match="at least one budget"):
        BudgetReward({})


def test_budget_flags_resolve_to_counts_and_aim_the_reward():
    cfg = load_config("demo", ["budget.compression=10", "budget.params=20000", "budget.flops=0.5"])
    limits = cfg.budget.limits(156_970, 7_150_080)
    assert limits == {"params": 15_697, "flops": 3_575_040}  # the stricter of params and 10x
    env_reward = cfg.reward.as_env_config(limits, {"params": 156_970, "flops": 7_150_080})
    assert env_reward["name"] == "budget"
    assert env_reward["budgets"] == pytest.approx({"params": 0.1, "flops": 0.5})
    assert make_reward(env_reward)(
        ChildScore(
            0.9,
            0.9,
            params=15_000,
            teacher_params=156_970,
            flops=3_000_000,
            teacher_flops=7_150_080,
        )  # fmt: skip
    ) == pytest.approx(1.0)
    plain = load_config("demo").reward.as_env_config({}, {"params": 1, "flops": 1})
    assert plain == {"name": "n2n"}  # no budget: N2N's reward, as before


def test_candidates_are_the_best_children_within_the_budget():
    rows = [
        _row("a", 5000, 0.99, 0.95),  # the best reward, but over budget
        _row("b", 900, 0.95, 0.93),
        _row("c", 1000, 0.96, 0.94),
        _row("c", 1000, 0.96, 0.94),  # a cache hit: one candidate per architecture
        _row("d", 400, 0.90, 0.90),
        {**_row("e", 100, 0.0, -1.0), "error": "NonFiniteLossError: nan"},
    ]
    chosen = top_candidates(rows, 2, {"params": 1000})
    assert [r["arch_hash"] for r in chosen] == ["c", "b"]
    assert all(within(r, {"params": 1000}) for r in chosen)
    assert [r["arch_hash"] for r in top_candidates(rows, 2)] == ["a", "c"]  # no budget
    with pytest.raises(NoFeasibleStudent, match="smallest of 4 architectures evaluated has 400"):
        top_candidates(rows, 2, {"params": 300})


def test_the_final_student_is_the_most_accurate_on_validation_within_budget():
    """After fine-tuning, the student with the best validation accuracy is chosen (the budget
    reward within budget is accuracy alone), whatever the search's own ranking was."""
    reward = BudgetReward({"params": 0.1})
    students = [
        {"rank": 1, "params": 95, "val_accuracy": 0.91, "test_accuracy": 0.95},
        {"rank": 2, "params": 60, "val_accuracy": 0.93, "test_accuracy": 0.90},
        {"rank": 3, "params": 99, "val_accuracy": 0.92, "test_accuracy": 0.99},
    ]
    for s in students:
        s["reward"] = reward(ChildScore(s["val_accuracy"], 0.95, params=s["params"],
                                        teacher_params=1000))  # fmt: skip
    assert choose_best(students)["rank"] == 2  # by validation, never by test accuracy
    assert [s.get("best", False) for s in students] == [False, True, False]


def test_the_budget_line_says_whether_and_by_how_much():
    met = {"limits": {"params": 1000}, "met": True, "margin": {"params": 0.05}}
    assert budget_line(met) == "budget params <= 1,000: met (params 5.0% under)"
    none = {"limits": {"params": 1000}, "met": False, "margin": {}}
    assert "no student within it" in budget_line(none)
    assert budget_line(None) is None


# --------------------------------------------------------------------------- real runs


def _flags(run_dir: Path, *extra: str) -> list[str]:
    return [
        "run", "--run-dir", str(run_dir), "--no-tracking", "--quiet", "--episodes", "4",
        "--iterations", "2", "--set", "teacher.epochs=4", "--set", "distill.steps=20",
        "--set", "finetune.steps=40", "--set", "finetune.top_k=2", *extra,
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_budget_run_on_digits_gives_a_student_within_it_from_a_sparse_teacher(
    ray_cluster, tmp_path: Path, capsys
):
    run_dir = tmp_path / "run"
    address = ray_cluster.get_runtime_context().gcs_address
    code = main(_flags(run_dir, "--params", "20000", "--address", address,
                       "--set", "search.sparsity_steps=60", "--set", "search.sparsity_l1=0.05",
                       "--set", "shrinkage.importance=bn"))  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    summary = RunDir(run_dir).summary()
    budget = summary["budget"]
    assert budget["limits"] == {"params": 20000} and budget["met"] is True
    assert summary["student"]["params"] <= 20000
    assert budget["margin"]["params"] == pytest.approx(1 - summary["student"]["params"] / 20000)
    assert "budget params <= 20,000: met" in out
    best = load_checkpoint(run_dir / "best", num_classes=10)
    assert count_params(best.model) == summary["student"]["params"] <= 20000
    # Every fine-tuned student fits; the best is the most accurate of them on validation.
    students = summary["students"]
    assert all(s["params"] <= 20000 for s in students)
    assert max(students, key=lambda s: s["val_accuracy"])["best"]
    # The sparsity phase ran: its BatchNorm scales are sparser than the teacher's, and the
    # children were cut from it (stage 2 starts from a child holding its weights).
    teacher = load_checkpoint(run_dir / "teacher")
    sparse = load_checkpoint(run_dir / "sparse_teacher")
    l1 = lambda m: sum(b.weight.abs().sum().item() for b in m.modules()  # noqa: E731
                       if isinstance(b, torch.nn.BatchNorm2d))  # fmt: skip
    assert l1(sparse.model) < 0.9 * l1(teacher.model)
    start = run_dir / "removal_best"
    if start.is_dir():
        child = load_checkpoint(start)
        kept = [n for n, _ in child.model.named_parameters() if n.endswith("features.0.weight")]
        for name in kept:
            assert torch.equal(dict(child.model.named_parameters())[name],
                               dict(sparse.model.named_parameters())[name])  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compression_and_flops_flags_give_a_student_within_both(ray_cluster, tmp_path: Path):
    run_dir = tmp_path / "run"
    address = ray_cluster.get_runtime_context().gcs_address
    code = main(_flags(run_dir, "--compression", "8", "--flops", "0.5", "--skip-removal",
                       "--address", address))  # fmt: skip
    assert code == 0
    summary = RunDir(run_dir).summary()
    teacher, student, budget = summary["teacher"], summary["student"], summary["budget"]
    assert budget["limits"] == {"params": int(teacher["params"] / 8),
                                "flops": int(teacher["flops"] * 0.5)}  # fmt: skip
    assert budget["met"] is True
    assert student["params"] <= teacher["params"] / 8 and student["flops"] <= teacher["flops"] / 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_removal_fitted_to_the_budget_scores_every_mask_at_it_and_hands_on_its_removals(
    ray_cluster, tmp_path: Path
):
    run_dir = tmp_path / "run"
    address = ray_cluster.get_runtime_context().gcs_address
    code = main(_flags(run_dir, "--params", "20000", "--address", address,
                       "--set", "removal.fit_budget=true"))  # fmt: skip
    assert code == 0
    out = RunDir(run_dir)
    removal = [r for r in out.children("removal") if not r["error"]]
    assert removal and all(r["params"] <= 20000 for r in removal)  # no removal child over it
    shrunk = [r for r in removal if r["ratios"]]  # the others fit with their removals alone
    assert shrunk and all(len(set(r["ratios"].values())) == 1 for r in shrunk)
    assert all(r["reward"] > 0 for r in removal)  # within budget: accuracy alone, never negative
    # Stage 2 starts from the best removal with its removals alone; it chooses the widths.
    best = max(removal, key=lambda r: r["reward"])
    start = load_checkpoint(run_dir / "removal_best")
    assert start.spec["removed"] == sorted(best["removed"]) and start.spec["channels"] == {}
    assert count_params(start.model) > 20000
    summary = out.summary()
    assert summary["budget"]["met"] and summary["student"]["params"] <= 20000


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_budget_no_child_can_meet_exits_5_and_keeps_the_run(ray_cluster, tmp_path: Path, capsys):
    run_dir = tmp_path / "run"
    address = ray_cluster.get_runtime_context().gcs_address
    code = main(_flags(run_dir, "--params", "50", "--address", address, "--skip-removal"))
    assert code == Exit.INFEASIBLE == 5
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "no student within the budget (params <= 50)" in err[0], err
    assert str(run_dir) in err[0]
    kept = RunDir(run_dir)
    assert len(kept.children("shrinkage")) == 8 and (run_dir / "teacher" / "weights.pt").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["student"] is None and summary["budget"]["met"] is False
    assert summary["smallest_child"] > 50
    # What the search spent is kept, so an infeasible search still counts in a cost comparison.
    assert (
        summary["cost"]["kd_steps_children"]
        == sum(r["kd_steps"] for r in kept.children("shrinkage") if not r["cache_hit"])
        > 0
    )
