"""The KD evaluator on a real local Ray cluster: children as tasks, failures, cache, Tune."""

from __future__ import annotations

import os
import pickle
import sys
import uuid

import numpy as np
import pytest
import torch
from torch import nn

from envs.costs import model_costs
from envs.evaluation import Child, ChildResult, load_evaluator
from envs.spec import arch_hash
from envs.surgery import make_child
from pipeline.children.evaluator import KDEvaluator
from pipeline.data.datasets import load_dataset
from pipeline.data.teachers import load_teacher

REDUCED = {
    "remove": ["features.6"],
    "ratios": {
        "features.0": 0.5,
        "features.3": 0.5,
        "features.10": 0.5,
        "features.13": 0.5,
        "hidden": 0.5,
    },
}
"""A surgically reduced small_cnn child: one conv layer removed, every other layer halved."""
DISTILL = {"steps": 60, "lr": 0.05, "measure_initial": True}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def teacher_dir(digits_teacher_dir):
    return digits_teacher_dir  # trained once per session (conftest)


@pytest.fixture(scope="module")
def teacher(teacher_dir, digits):
    return load_teacher(teacher_dir, digits)


@pytest.fixture(scope="module")
def evaluator(ray_cluster, teacher_dir):
    ev = KDEvaluator(
        teacher=teacher_dir, distill=DISTILL, timeout_s=120, cache_name=f"test-{uuid.uuid4().hex}"
    )
    ev.prepare()
    yield ev
    ev.close()


def as_child(model: nn.Module, spec: dict) -> Child:
    costs = model_costs(model, (1, 8, 8))
    return Child(model, spec, arch_hash(spec), costs.params, costs.flops, costs.size_bytes, "test")


def surgery(teacher, **kwargs) -> Child:
    return as_child(*make_child(teacher.model, teacher.spec, **kwargs))


def odd_child(model: nn.Module, name: str) -> Child:
    """A child that is not a surgery product, under an arch hash of its own."""
    return Child(model, {}, f"odd-{name}-{uuid.uuid4().hex[:8]}", 0, 0, 0, "test")


# Modules the tests define must reach Ray workers by value: workers cannot import this file.
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class CrashOnce(nn.Module):
    """Kills its worker process the first time it runs (a lost worker), then behaves."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return self.fc(x.flatten(1))


class AlwaysCrashes(nn.Module):
    """Kills its worker process every time it runs and counts its attempts in a file."""

    def __init__(self, counter: str) -> None:
        super().__init__()
        self.counter = counter
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with open(self.counter, "a") as f:
            f.write("x\n")
        os._exit(1)


class AlwaysRaises(nn.Module):
    """Raises on every call and counts its attempts in a file."""

    def __init__(self, counter: str) -> None:
        super().__init__()
        self.counter = counter
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with open(self.counter, "a") as f:
            f.write("x\n")
        raise RuntimeError("boom in forward")


def test_kd_lifts_reduced_child_and_ratio_one_child_keeps_teacher_accuracy(evaluator, teacher):
    reduced = surgery(teacher, **REDUCED)
    same = surgery(teacher, ratios={"features.0": 1.0})
    assert reduced.params < same.params / 4
    r_reduced, r_same = evaluator.evaluate_many([reduced, same])
    assert r_reduced.error is None and r_same.error is None
    assert r_reduced.extra["initial_accuracy"] < 0.5
    assert r_reduced.accuracy > 0.85
    assert r_reduced.accuracy - r_reduced.extra["initial_accuracy"] > 0.4
    assert r_reduced.kd_steps == DISTILL["steps"]
    assert abs(r_same.accuracy - evaluator.teacher_accuracy) <= 0.03
    assert evaluator.teacher_accuracy > 0.9


def test_cache_prevents_second_training_of_an_architecture(evaluator, teacher):
    child = surgery(teacher, remove=["features.13"])
    before_stats, before_tasks = evaluator.cache_stats(), evaluator.tasks_submitted
    first = evaluator.evaluate(child)
    rebuilt = surgery(teacher, remove=["features.13"])  # a new model object, the same network
    second = evaluator.evaluate(rebuilt)
    stats = evaluator.cache_stats()
    assert evaluator.tasks_submitted == before_tasks + 1
    assert stats["misses"] == before_stats["misses"] + 1
    assert stats["hits"] == before_stats["hits"] + 1
    assert not first.cache_hit and second.cache_hit
    assert second.accuracy == first.accuracy and second.kd_steps == first.kd_steps

    # within one batch, duplicates train once; another process's copy shares the same cache
    twin_a, twin_b = surgery(teacher, remove=["hidden"]), surgery(teacher, remove=["hidden"])
    a, b = evaluator.evaluate_many([twin_a, twin_b])
    assert evaluator.tasks_submitted == before_tasks + 2
    assert a.accuracy == b.accuracy and not a.cache_hit and b.cache_hit
    clone = load_evaluator("pipeline.children.evaluator:KDEvaluator", evaluator.config())
    copied = pickle.loads(pickle.dumps(evaluator))
    assert clone.evaluate(surgery(teacher, remove=["hidden"])).cache_hit
    assert copied.evaluate(surgery(teacher, remove=["features.13"])).cache_hit
    assert clone.tasks_submitted == copied.tasks_submitted == 0
    stats = evaluator.cache_stats()
    assert stats["hits"] == before_stats["hits"] + 4  # rebuilt, twin_b, clone's, copy's
    assert stats["joined"] == before_stats["joined"] + 1  # twin_b waited for twin_a's training
    assert stats["misses"] == before_stats["misses"] + 2


class EnvRunnerLike:
    """Holds its own copy of an evaluator, as each RLlib env runner does."""

    def __init__(self, config: dict) -> None:
        self.evaluator = load_evaluator("pipeline.children.evaluator:KDEvaluator", config)

    def evaluate(self, child: Child) -> tuple:
        result = self.evaluator.evaluate(child)
        return result, self.evaluator.tasks_submitted

    def ready(self) -> bool:
        return True


def test_a_second_runner_waits_for_a_training_in_flight(ray_cluster, teacher_dir, teacher):
    import time

    # long enough (a few seconds) that the second runner asks while the first one trains
    shared = KDEvaluator(
        teacher=teacher_dir, distill={"steps": 400}, cache_name=f"test-{uuid.uuid4().hex}"
    )
    runner = ray_cluster.remote(num_cpus=0)(EnvRunnerLike)
    try:
        first, second = runner.remote(shared.config()), runner.remote(shared.config())
        # Both runners built first: a slow start of the second (loading its evaluator) once let
        # the first training finish before it asked, a plain cache hit instead of a join.
        ray_cluster.get([first.ready.remote(), second.ready.remote()])
        a = first.evaluate.remote(surgery(teacher, **REDUCED))
        deadline = time.monotonic() + 60
        while shared.cache_stats()["pending"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        b = second.evaluate.remote(surgery(teacher, **REDUCED))
        (result_a, tasks_a), (result_b, tasks_b) = ray_cluster.get([a, b])
        assert (tasks_a, tasks_b) == (1, 0)  # one training for two runners
        assert (
            result_a.error is None and result_b.accuracy == result_a.accuracy and result_b.cache_hit
        )
        assert shared.cache_stats() == {
            "hits": 1, "misses": 1, "joined": 1, "size": 1, "pending": 0, "path": None
        }  # fmt: skip
    finally:
        shared.close()


def test_sqlite_cache_is_reused_by_a_new_run(ray_cluster, teacher_dir, teacher, tmp_path):
    path = tmp_path / "run" / "cache.sqlite"
    settings = {"teacher": teacher_dir, "distill": {"steps": 5}, "cache_path": path}
    first = KDEvaluator(cache_name=f"test-{uuid.uuid4().hex}", **settings)
    second = KDEvaluator(cache_name=f"test-{uuid.uuid4().hex}", **settings)
    try:
        trained = first.evaluate(surgery(teacher, **REDUCED))
        reused = second.evaluate(surgery(teacher, **REDUCED))
        assert first.tasks_submitted == 1 and second.tasks_submitted == 0
        assert reused.cache_hit and reused.accuracy == trained.accuracy
        assert second.cache_stats() == {
            "hits": 1,
            "misses": 0,
            "joined": 0,
            "size": 1,
            "pending": 0,
            "path": str(path),
        }
    finally:
        first.close()
        second.close()


def test_failing_children_come_back_as_errors_with_their_reason(evaluator, teacher):
    wrong = odd_child(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), "wrong-outputs")
    nan_model, _ = make_child(teacher.model, teacher.spec, **REDUCED)
    with torch.no_grad():
        nan_model.get_submodule("features.0").weight.fill_(float("nan"))
    nan = odd_child(nan_model, "nan")
    r_wrong, r_nan = evaluator.evaluate_many([wrong, nan])
    assert r_wrong.failed and r_wrong.error.startswith("ValueError: student outputs shape (128, 3)")
    assert r_nan.failed and r_nan.error.startswith(
        "NonFiniteLossError: distillation loss became nan"
    )
    # deterministic failures are cached like results: the same child is not trained again
    tasks = evaluator.tasks_submitted
    again = evaluator.evaluate(wrong)
    assert again.cache_hit and again.error == r_wrong.error and evaluator.tasks_submitted == tasks


def test_child_past_its_timeout_fails_and_is_not_cached(ray_cluster, teacher_dir, teacher):
    slow = KDEvaluator(
        teacher=teacher_dir,
        distill={"steps": 10**6},
        timeout_s=1.0,
        cache_name=f"test-{uuid.uuid4().hex}",
    )
    try:
        child = surgery(teacher, **REDUCED)
        result = slow.evaluate(child)
        assert result.failed and result.accuracy is None
        assert result.error.startswith("ChildTimeoutError: exceeded the per-child timeout of 1 s")
        assert 1.0 <= result.wall_time_s < 30
        assert slow.cache_stats()["size"] == 0  # a timeout depends on load: try again next time
    finally:
        slow.close()


def test_env_scores_a_timed_out_child_minus_one_with_the_reason(ray_cluster, teacher_dir):
    from envs.env import RemovalEnv

    slow = KDEvaluator(
        teacher=teacher_dir,
        distill={"steps": 10**6},
        timeout_s=0.5,
        cache_name=f"test-{uuid.uuid4().hex}",
    )
    try:
        env = RemovalEnv({"teacher": str(teacher_dir), "evaluator": slow})
        env.reset(seed=0)
        _, reward, terminated, _, info = env.step(np.zeros(env.action_space.shape, dtype=np.int64))
        assert terminated and reward == -1.0
        assert info["error"].startswith("ChildTimeoutError")
    finally:
        slow.close()


def test_unschedulable_task_hits_the_hard_timeout(ray_cluster, teacher_dir, teacher):
    no_gpu = KDEvaluator(teacher=teacher_dir, num_gpus=1, hard_timeout_s=2, cache=False)
    result = no_gpu.evaluate(surgery(teacher, **REDUCED))
    assert result.failed and result.error.startswith("ChildTimeoutError: no result within 2 s")


def test_lost_worker_is_retried_and_counted_but_a_raising_child_is_not(
    ray_cluster, teacher_dir, tmp_path
):
    ev = KDEvaluator(
        teacher=teacher_dir, distill={"steps": 5}, max_retries=1,
        cache_name=f"test-{uuid.uuid4().hex}",
    )  # fmt: skip
    try:
        child = odd_child(CrashOnce(str(tmp_path / "crashed")), "crash")
        crash = ev.evaluate(child)
        assert (tmp_path / "crashed").exists()  # the first attempt died
        assert crash.error is None and crash.kd_steps == 5
        assert crash.extra["retries"] == 1 and ev.tasks_submitted == 2
        again = ev.evaluate(child)  # the cache keeps the result, not the retry
        assert again.cache_hit and again.accuracy == crash.accuracy
        assert "retries" not in again.extra

        counter = tmp_path / "crashes"
        lost = ev.evaluate(odd_child(AlwaysCrashes(str(counter)), "always-crash"))
        assert counter.read_text().count("x") == 2  # the first run and its one retry
        assert lost.failed and lost.error.startswith("WorkerCrashedError: ")
        assert lost.error.endswith("(lost 2 times, max_retries=1)") and lost.extra["retries"] == 1
        assert ev.cache_stats()["pending"] == 0 and ev.cache_stats()["size"] == 1  # not cached

        counter = tmp_path / "attempts"
        raised = ev.evaluate(odd_child(AlwaysRaises(str(counter)), "raise"))
        assert raised.error == "RuntimeError: boom in forward"
        assert counter.read_text().count("x") == 1 and "retries" not in raised.extra
    finally:
        ev.close()


class Owner:
    """An env runner stand-in whose evaluator owns the child task it submits."""

    def __init__(self, config: dict) -> None:
        self.evaluator = load_evaluator("pipeline.children.evaluator:KDEvaluator", config)

    def evaluate(self, child: Child) -> ChildResult:
        return self.evaluator.evaluate(child)


def test_a_runner_whose_producer_died_takes_the_training_over(ray_cluster, teacher_dir, teacher):
    import time

    shared = KDEvaluator(
        teacher=teacher_dir, distill={"steps": 200}, cache_name=f"test-{uuid.uuid4().hex}"
    )
    try:
        producer = ray_cluster.remote(num_cpus=0)(Owner).remote(shared.config())
        producer.evaluate.remote(surgery(teacher, **REDUCED))
        deadline = time.monotonic() + 60
        while shared.cache_stats()["pending"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert shared.cache_stats()["pending"] == 1
        # This runner joins the producer's training, whose owner then dies (a lost env runner).
        joiner = load_evaluator("pipeline.children.evaluator:KDEvaluator", shared.config())
        ray_cluster.kill(producer)
        result = joiner.evaluate(surgery(teacher, **REDUCED))
        assert result.error is None and result.kd_steps == 200
        assert result.extra["retries"] == 1 and joiner.tasks_submitted == 1
        assert not result.cache_hit  # trained by the joiner itself, after the take-over
        stats = shared.cache_stats()
        assert stats["pending"] == 0 and stats["size"] == 1
    finally:
        shared.close()


def test_local_mode_needs_no_cluster(teacher_dir, teacher):
    ev = KDEvaluator(
        teacher=teacher_dir,
        distill={"steps": 10},
        local=True,
        measure_latency=True,
        latency_batch=16,
    )
    first = ev.evaluate(surgery(teacher, **REDUCED))
    second = ev.evaluate(surgery(teacher, **REDUCED))
    assert first.error is None and not first.cache_hit and second.cache_hit
    assert first.latency_s > 0 and first.extra["latency_batch_s"] > 0
    assert first.extra["latency_batch"] == 16
    assert ev.tasks_submitted == 1 and ev.cache_stats()["hits"] == 1


def test_bad_settings_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="needs teacher="):
        KDEvaluator()
    with pytest.raises(ValueError, match=f"teacher checkpoint {tmp_path}/none is not a folder"):
        KDEvaluator(teacher=tmp_path / "none")
    with pytest.raises(ValueError, match="unknown distill settings \\['epoch'\\]"):
        KDEvaluator(teacher=tmp_path, distill={"epoch": 1})
    with pytest.raises(ValueError, match="num_cpus=0"):
        KDEvaluator(teacher=tmp_path, num_cpus=0)


def _tune_trial(config, evaluator_config, teacher_dir):
    """A Tune trial that builds the removal env with the KD evaluator and steps it once."""
    from ray import tune

    from envs.env import RemovalEnv

    env = RemovalEnv(
        {
            "teacher": teacher_dir,
            "evaluator": "pipeline.children.evaluator:KDEvaluator",
            "evaluator_config": evaluator_config,
        }
    )
    env.reset(seed=0)
    action = np.zeros(env.action_space.shape, dtype=np.int64)
    action[env.units.index("features.6")] = 1
    _, reward, _, _, info = env.step(action)
    tune.report({"reward": reward, "accuracy": info["accuracy"], "error": info["error"] or ""})


@pytest.mark.timeout(240)
def test_task_launched_from_an_env_inside_a_tune_trial_completes(evaluator, teacher_dir, tmp_path):
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(
            _tune_trial, evaluator_config=evaluator.config(), teacher_dir=str(teacher_dir)
        ),
        {"cpu": 1},  # the trial's placement group holds one CPU; the child needs the other
    )
    tuner = tune.Tuner(
        trainable, run_config=tune.RunConfig(storage_path=str(tmp_path), name="t", verbose=0)
    )
    results = tuner.fit()
    assert not results.errors
    metrics = results[0].metrics
    assert metrics["error"] == ""
    assert metrics["accuracy"] > 0.85
    assert 0 < metrics["reward"] <= 1
