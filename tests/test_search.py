"""The search: records and outputs, the random baseline, PPO against it, and whole runs.

The slow tests run real Ray (the session's 2-CPU cluster), real RLlib and real Tune; the
end-to-end ones also train real KD children on digits.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

from envs.checkpoint import load_checkpoint
from envs.env import RemovalEnv, ShrinkageEnv
from envs.evaluation import SyntheticEvaluator
from pipeline.config.presets import load_config
from pipeline.job import sweeps
from pipeline.job.run import run
from pipeline.search.random_search import random_episode
from pipeline.search.records import child_row
from pipeline.tracking.progress import iteration_stats
from pipeline.tracking.rundir import RunDir, pareto
from pipeline.tracking.tables import summary_table

REPO = Path(__file__).resolve().parent.parent
TEACHER = {
    "arch": "small_cnn",
    "kwargs": {"width": 0.5, "in_channels": 1},
    "input_shape": [1, 8, 8],
}
IMPORTANT = ["features.6", "hidden"]
"""Units whose removal costs the synthetic evaluator accuracy: the best mask keeps exactly these."""


def synthetic_env(**extra: Any) -> RemovalEnv:
    return RemovalEnv(
        {"teacher": TEACHER, "evaluator": SyntheticEvaluator(important=IMPORTANT), **extra}
    )


# --------------------------------------------------------------------------- fast


def test_child_rows_are_json_and_round_trip_through_children_csv(tmp_path: Path) -> None:
    env = synthetic_env()
    env.reset(seed=0)
    _, reward, *_, info = env.step(np.array([1, 0, 1, 0, 0]))
    row = child_row(info)
    json.dumps(row)  # plain data only: no tensors, no modules
    assert row["removed"] == ["features.3", "features.10"]
    assert row["reward"] == pytest.approx(reward)
    run = RunDir(tmp_path)
    run.append_children([{**row, "episode": 1, "iteration": 1, "trial": "t"}])
    run.append_children(
        [{**row, "episode": 2, "iteration": 1, "trial": "t", "error": "RuntimeError: x"}]
    )
    back = run.children("removal")
    assert [r["episode"] for r in back] == [1, 2]
    assert back[0]["spec"] == row["spec"] and back[0]["action"] == [1, 0, 1, 0, 0]
    assert back[0]["params"] == row["params"] and back[0]["cache_hit"] is False
    assert back[1]["error"] == "RuntimeError: x" and back[0]["error"] is None


def test_pareto_front_keeps_only_undominated_children() -> None:
    rows = [
        {"arch_hash": "a", "params": 100, "accuracy": 0.9, "reward": 0.1},
        {"arch_hash": "b", "params": 50, "accuracy": 0.8, "reward": 0.5},
        {"arch_hash": "c", "params": 60, "accuracy": 0.7, "reward": 0.3},  # dominated by b
        {"arch_hash": "d", "params": 10, "accuracy": 0.5, "reward": 0.6},
        {"arch_hash": "e", "params": 5, "accuracy": None, "reward": -1.0, "error": "X: y"},
        {"arch_hash": "b", "params": 50, "accuracy": 0.8, "reward": 0.5, "cache_hit": True},
    ]
    assert [r["arch_hash"] for r in pareto(rows)] == ["d", "b", "a"]


def test_iteration_stats_count_failures_and_track_the_best() -> None:
    rows = [
        {"reward": 0.5, "accuracy": 0.9, "compression": 0.4, "cache_hit": False},
        {"reward": -1.0, "accuracy": None, "compression": 0.9, "error": "E: x", "cache_hit": False},
        {"reward": 0.7, "accuracy": 0.8, "compression": 0.6, "cache_hit": True},
    ]
    stats = iteration_stats(rows[1:], rows)
    assert stats["reward_mean"] == pytest.approx(-0.15)
    assert (stats["reward_min"], stats["reward_max"]) == (-1.0, 0.7)
    assert (stats["best_reward"], stats["best_compression"]) == (0.7, 0.6)
    assert (stats["failed"], stats["cache_hits"], stats["children_total"]) == (1, 1, 3)


def test_random_episodes_stay_in_the_action_space_in_both_shrinkage_modes() -> None:
    rng = np.random.default_rng(0)
    config = {"teacher": TEACHER, "evaluator": SyntheticEvaluator(), "ratios": [0.5, 1.0]}
    for env in (
        synthetic_env(),
        ShrinkageEnv(config),
        ShrinkageEnv({**config, "sequential": True}),
    ):
        returns = [random_episode(env, rng) for _ in range(3)]
        assert all(-1.0 <= r <= 1.0 for r in returns)
    sequential = ShrinkageEnv({**config, "sequential": True})
    random_episode(sequential, rng)  # a whole episode: one step per shrinkable unit
    assert len(sequential._choices) == len(sequential.units)
    with pytest.raises(ValueError, match="cannot sample"):
        random_episode(_BoxEnv(), rng)


class _BoxEnv(gym.Env):
    observation_space = gym.spaces.Box(0, 1, (1,))
    action_space = gym.spaces.Box(0, 1, (1,))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        return np.zeros(1, np.float32), {}


def test_sweep_variants_validate_every_combination() -> None:
    cfg = load_config("demo", ["sweep.grid={search.algo: [ppo, random], removal.lr: [0.01, 0.1]}"])
    variants = sweeps.sweep_variants(cfg)
    assert [label for label, _ in variants][0] == "search.algo=ppo removal.lr=0.01"
    assert {(v.search.algo, v.removal.lr) for _, v in variants} == {
        ("ppo", 0.01),
        ("ppo", 0.1),
        ("random", 0.01),
        ("random", 0.1),
    }
    seeds = sweeps.sweep_variants(load_config("demo", ["sweep.num_samples=3"]))
    assert [v.seed for _, v in seeds] == [0, 1, 2]
    with pytest.raises(ValueError, match="'removal.iterations'"):
        sweeps.sweep_variants(load_config("demo", ["sweep.grid={removal.iterations: [1, 0]}"]))
    with pytest.raises(ValueError, match="cannot vary"):
        sweeps.sweep_variants(load_config("demo", ["sweep.grid={distill.steps: [10, 20]}"]))
    with pytest.raises(ValueError, match="needs sweep.grid"):
        sweeps.sweep_variants(load_config("demo"))


def test_a_cluster_too_small_for_one_child_is_named(ray_cluster, tmp_path: Path, capsys) -> None:
    code = _run(
        [
            "run",
            "--run-dir",
            str(tmp_path / "run"),
            "--no-tracking",
            "--set",
            "ray.cpus_per_child=4",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "has 2 CPUs" in err and "needs 4.5" in err and "\n" not in err


# --------------------------------------------------------------------------- slow


def _settings(tmp_path: Path, *extra: str) -> list[str]:
    """Overrides for a quick run in ``tmp_path``: tiny teacher budget, no MLflow."""
    return [
        f"output.run_dir={tmp_path / 'run'}",
        "tracking.enabled=false",
        "teacher.epochs=4",
        "ray.cpus_per_child=1",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ppo_beats_random_search_on_the_synthetic_evaluator(ray_cluster, tmp_path: Path) -> None:
    seeds = [0, 1, 2]
    cfg = load_config(
        "demo",
        _settings(
            tmp_path,
            "shrinkage.enabled=false",
            "teacher.epochs=1",
            "search.evaluator=envs.evaluation:SyntheticEvaluator",
            f"search.evaluator_kwargs={{important: [{', '.join(IMPORTANT)}]}}",
            "search.hidden=16",
            "removal.iterations=6",
            "removal.episodes_per_iteration=8",
            "removal.lr=0.02",
            "removal.num_epochs=8",
            "removal.entropy_coeff=0.0",
            f"sweep.grid={{search.algo: [ppo, random], seed: {seeds}}}",
            "sweep.scheduler=none",
            "sweep.max_concurrent=3",
        ),
    ).resolve_paths()
    table = sweeps.sweep(cfg, sweeps.sweep_variants(cfg))
    means: dict[str, list[float]] = {"ppo": [], "random": []}
    for row in table:
        assert row["episodes"] == 6 * 8, row  # same number of children for both, none dropped
        means[row["label"].split()[0].split("=")[1]].append(row["reward_mean"])
    assert len(means["ppo"]) == len(means["random"]) == len(seeds)
    # Random search's mean is the landscape's mean (0.46); PPO concentrates on good masks.
    assert np.mean(means["ppo"]) > np.mean(means["random"]) + 0.05, means
    assert sum(p > r for p, r in zip(means["ppo"], means["random"], strict=True)) >= 2, means
    children = RunDir(cfg.output.run_dir).children()
    assert len(children) == 6 * 48 and {r["trial"] for r in children} == {r["trial"] for r in table}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_env_runners_draw_different_children(ray_cluster, tmp_path: Path) -> None:
    """Two env runners seeded alike drew the same actions: every child of an iteration came
    twice (the second from the cache). A fresh policy over 32 removal masks, 8 draws in two
    runners, gives at most 4 distinct children that way."""
    cfg = load_config(
        "demo",
        _settings(
            tmp_path, "shrinkage.enabled=false", "teacher.epochs=1", "search.env_runners=2",
            "search.evaluator=envs.evaluation:SyntheticEvaluator", "removal.iterations=2",
            "removal.episodes_per_iteration=8", "shrinkage.episodes_per_iteration=8",
        ),
    ).resolve_paths()  # fmt: skip
    run(cfg, tracker=None)
    rows = RunDir(cfg.output.run_dir).children("removal")
    for iteration in (1, 2):
        actions = [tuple(r["action"]) for r in rows if r["iteration"] == iteration]
        assert len(actions) == 8 and len(set(actions)) > 4, actions


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_random_search_with_two_workers_builds_every_child_and_repeats_itself(
    ray_cluster, tmp_path: Path
) -> None:
    """Random search once played its env runners in threads of one process: torch.fx's
    process-wide patching and the envs' global random state made concurrent surgeries fail
    ("CURRENT_PATCHER is None", "module is not installed as a submodule") and the draws
    depend on timing. A ResNet-18 makes each trace long, a budget makes every shrinkage step
    several surgeries (the cap's bisection), and the synthetic evaluator leaves little else, so
    the two workers overlap all along (the threads failed 3 of 26 children here)."""
    children = []
    for attempt in (1, 2):
        cfg = load_config(
            "demo",
            _settings(
                tmp_path / str(attempt), "search.algo=random", "search.env_runners=2",
                "search.evaluator=envs.evaluation:SyntheticEvaluator", "budget.compression=6",
                "teacher.arch=resnet18", "teacher.width=0.25", "teacher.epochs=1",
                "removal.iterations=2", "removal.episodes_per_iteration=4",
                "shrinkage.iterations=3", "shrinkage.episodes_per_iteration=6",
            ),
        ).resolve_paths()  # fmt: skip
        run(cfg, tracker=None)
        rows = RunDir(cfg.output.run_dir).children()
        assert len(rows) == 2 * 4 + 3 * 6
        assert [r["error"] for r in rows if r["error"]] == []
        children.append(sorted((r["stage"], r["iteration"], r["arch_hash"]) for r in rows))
    assert children[0] == children[1]


def _run(argv: list[str]) -> int:
    from pipeline.cli.main import main

    return main(argv)


def _quick_run_flags(run_dir: Path, *extra: str) -> list[str]:
    """A demo run on a budget CI can afford: real KD children on digits, a few of them."""
    return [
        "run", "--run-dir", str(run_dir), "--no-tracking", "--quiet", "--episodes", "4",
        "--set", "teacher.epochs=4", "--set", "teacher.width=0.5", "--set", "distill.steps=30",
        "--set", "finetune.steps=60",
        "--set", "finetune.top_k=2", *extra,
    ]  # fmt: skip


def _check_run_dir(run_dir: Path, stages: dict[str, int]) -> dict[str, Any]:
    """Asserts what every finished run directory holds; returns its summary."""
    for name in ("config.yaml", "state.json", "children.csv", "iterations.csv", "pareto.csv",
                 "summary.json", "cache.sqlite", "teacher/weights.pt", "best/spec.json",
                 "best/weights.pt", "best/metrics.json", "students/1/weights.pt"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    out = RunDir(run_dir)
    for stage, expected in stages.items():
        rows = out.children(stage)
        assert len(rows) >= expected, (stage, len(rows))
        for row in rows:
            assert row["reward"] == -1.0 if row["error"] else -1.0 <= row["reward"] <= 1.0
            assert (
                row["arch_hash"] and row["params"] > 0 and row["spec"]["format"] == "n2n-student/1"
            )
    for row in out.iterations():
        assert int(row["episodes"]) >= int(row["episodes_expected"]), row  # nothing dropped
    front = list(csv_rows(run_dir / "pareto.csv"))
    assert front and [int(r["params"]) for r in front] == sorted(int(r["params"]) for r in front)
    summary = out.summary()
    teacher, student = summary["teacher"], summary["student"]
    assert student["params"] < teacher["params"] and student["flops"] <= teacher["flops"]
    assert summary["compression_ratio"] == pytest.approx(teacher["params"] / student["params"])
    assert student["val_accuracy"] > 0.5 and student["test_accuracy"] > 0.5  # chance is 0.1
    # The student reloads from spec.json + weights.pt alone to the accuracy reported.
    from pipeline.data.datasets import load_dataset
    from pipeline.torch_utils import evaluate_accuracy

    splits = load_dataset("digits", val_fraction=0.2, seed=0)
    reloaded = load_checkpoint(run_dir / "best", num_classes=10)
    assert evaluate_accuracy(reloaded.model, *splits.test) == pytest.approx(
        student["test_accuracy"], abs=1e-9
    )
    assert reloaded.metrics["arch_hash"] == student["arch_hash"]
    assert sum(p.numel() for p in reloaded.model.parameters()) == student["params"]
    assert "test acc" in str(summary_table(summary).columns[5].header)
    return summary


def csv_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _cache_keys(run_dir: Path) -> set[str]:
    import sqlite3

    with sqlite3.connect(run_dir / "cache.sqlite") as db:
        return {row[0] for row in db.execute("SELECT key FROM results")}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_with_ppo_survives_an_interruption_and_resumes_without_retraining(
    ray_cluster, tmp_path: Path
) -> None:
    """One demo run, end to end: interrupted (Ctrl+C) during stage 1, then ``--resume``d."""
    run_dir = tmp_path / "demo"
    address = ray_cluster.get_runtime_context().gcs_address
    flags = _quick_run_flags(run_dir, "--iterations", "3", "--address", address)
    first = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *flags],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    iterations = run_dir / "iterations.csv"
    deadline = time.monotonic() + 150
    while not (iterations.is_file() and len(iterations.read_text().splitlines()) >= 2):
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "no search iteration finished in time"
        time.sleep(0.5)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=90)
    assert first.returncode == 130, err
    assert f"n2n run --resume {run_dir}" in err.strip().splitlines()[-1]
    trained_before = _cache_keys(run_dir)
    recorded_before = len(RunDir(run_dir).children())
    assert trained_before and recorded_before >= 4 and not RunDir(run_dir).done("removal")

    assert _run(["run", "--resume", str(run_dir), "--quiet"]) == 0
    summary = _check_run_dir(run_dir, {"removal": 12, "shrinkage": 12})
    trained_after = _cache_keys(run_dir)
    # Every child trained after the resume is a new architecture: none was trained twice.
    assert summary["cache"]["misses"] == len(trained_after - trained_before)
    before = {key.split("-")[0] for key in trained_before}
    for row in RunDir(run_dir).children()[recorded_before:]:  # recorded after the resume
        if row["arch_hash"] in before:
            assert row["cache_hit"], row
    # Stage 1 continued from its Tune checkpoint instead of starting over: 3 x 4 children.
    removal = RunDir(run_dir).children("removal")
    assert len(removal) == 12 and {r["iteration"] for r in removal} == {1, 2, 3}
    assert summary["algo"] == "ppo" and len(summary["students"]) == 2
    # Stage 2 shrank stage 1's best child, not the teacher.
    start = json.loads((run_dir / "removal_best" / "spec.json").read_text())
    assert all(
        r["spec"]["removed"] == start["removed"] for r in RunDir(run_dir).children("shrinkage")
    )


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_demo_runs_end_to_end_with_appo_and_is_tracked_in_mlflow(
    ray_cluster, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    run_dir, uri = tmp_path / "appo", f"sqlite:///{tmp_path / 'mlflow.db'}"
    flags = _quick_run_flags(run_dir, "--algo", "appo", "--iterations", "2", "--skip-shrinkage")
    flags.remove("--no-tracking")
    flags += ["--tracking-uri", uri, "--set", "tracking.experiment=appo-test",
              "--set", "tracking.registry_name=appo-student"]  # fmt: skip
    assert _run(flags) == 0
    summary = _check_run_dir(run_dir, {"removal": 8})
    assert summary["algo"] == "appo" and not RunDir(run_dir).children("shrinkage")

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("appo-test")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.params["search.algo"] == "appo"
    assert parent.data.metrics["compression/ratio"] == pytest.approx(summary["compression_ratio"])
    stage = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    history = client.get_metric_history(stage.info.run_id, "reward/mean")
    assert [m.step for m in history] == [1, 2]
    version = client.get_model_version_by_alias("appo-student", "champion")
    assert version.run_id == parent.info.run_id
