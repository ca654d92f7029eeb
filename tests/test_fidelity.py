"""Multi-fidelity child evaluation: the stopping rule, its safety, and its wiring.

The acceptance test simulates the evaluator's rule on synthetic learning curves that satisfy
the rule's assumption (non-decreasing, concave); the other tests train real KD children on
scikit-learn's digits, in this process and as Ray tasks.
"""

from __future__ import annotations

import functools
import math
import pickle
import uuid

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from envs.costs import model_costs
from envs.env import RemovalEnv, reward_at
from envs.evaluation import Child, ChildResult
from envs.rewards import ChildScore, n2n_reward
from envs.spec import arch_hash
from envs.surgery import make_child
from pipeline.children.cache import RewardCache
from pipeline.children.distill import distill
from pipeline.children.early_stop import EarlyStop, accuracy_upper_bound, should_stop
from pipeline.children.evaluator import KDEvaluator
from pipeline.children.kd import KDSettings, teacher_logits
from pipeline.config.schema import DistillConfig as DistillSection
from pipeline.data.teachers import load_teacher
from pipeline.search.records import child_row

TEACHER_ACC = 0.95
TEACHER_PARAMS = 1_000_000


def n2n_at(compression: float):
    """The picklable ``Child.reward_at`` the envs build, for a child of this compression."""
    params = round((1.0 - compression) * TEACHER_PARAMS)
    template = ChildScore(0.0, TEACHER_ACC, params, TEACHER_PARAMS)
    return functools.partial(reward_at, n2n_reward, template)


# --------------------------------------------------------------------------- the rule


def test_upper_bound_extrapolates_the_last_two_points():
    assert accuracy_upper_bound([], 100) == 1.0
    assert accuracy_upper_bound([(25, 0.3)], 100) == 1.0  # one point bounds nothing
    # slope 0.1 / 25 steps, 50 steps to go: 0.6 + 0.2
    assert accuracy_upper_bound([(25, 0.5), (50, 0.6)], 100) == pytest.approx(0.8)
    assert accuracy_upper_bound([(25, 0.5), (50, 0.6)], 100, slack=0.01) == pytest.approx(0.81)
    # only the last two points count (the steepest earlier slope is looser under concavity)
    assert accuracy_upper_bound([(10, 0.0), (25, 0.5), (50, 0.6)], 100) == pytest.approx(0.8)
    # a dip (noise) is not extrapolated downwards: never below the last point
    assert accuracy_upper_bound([(25, 0.7), (50, 0.65)], 100) == pytest.approx(0.65)
    assert accuracy_upper_bound([(25, 0.4), (50, 0.8)], 100) == 1.0  # clipped
    assert accuracy_upper_bound([(50, 0.4), (100, 0.5)], 100, slack=0.02) == pytest.approx(0.52)
    with pytest.raises(ValueError, match="steps must increase"):
        accuracy_upper_bound([(50, 0.4), (50, 0.5)], 100)


def test_should_stop_compares_the_best_reachable_reward_with_the_kth_best():
    settings = EarlyStop(slack=0.0)
    at = n2n_at(0.5)  # C(2-C) = 0.75: reward = 0.75 * A / 0.95
    curve = [(25, 0.5), (50, 0.6)]  # bound 0.8: reward 0.6316
    assert not should_stop(curve, 100, at, None, settings)  # fewer than k finished
    assert should_stop(curve, 100, at, 0.64, settings)
    assert not should_stop(curve, 100, at, 0.63, settings)
    # one point: the bound is 1.0, so only a child hopeless at any accuracy stops
    assert should_stop(curve[:1], 100, at, 0.8, settings)
    assert not should_stop(curve[:1], 100, at, 0.78, settings)
    assert not should_stop([], 100, at, 0.9, settings)


def test_early_stop_settings_are_validated_and_map_to_steps():
    assert EarlyStop().checkpoint_steps(100) == [25, 50]
    assert EarlyStop(checkpoints=(0.5, 0.25)).checkpoints == (0.25, 0.5)
    assert EarlyStop().checkpoint_steps(3) == [1, 2]
    assert EarlyStop().checkpoint_steps(1) == []  # too short to measure before the end
    assert EarlyStop.from_dict({"top_k": 5}).top_k == 5
    with pytest.raises(ValueError, match=r"checkpoints \[0.5, 1.0\] must be fractions"):
        EarlyStop(checkpoints=(0.5, 1.0))
    with pytest.raises(ValueError, match="top_k 0"):
        EarlyStop(top_k=0)
    with pytest.raises(ValueError, match=r"unknown early-stop settings \['topk'\]"):
        EarlyStop.from_dict({"topk": 3})


def test_run_config_switches_early_stopping_on_for_the_evaluator():
    section = DistillSection(early_stop=True, checkpoints=[0.5, 0.25], early_stop_slack=0.02)
    assert KDSettings.from_dict(section.as_kwargs(seed=0)).channels_last  # no unknown keys
    settings = EarlyStop.from_dict(section.early_stop_kwargs(top_k=2))
    assert settings == EarlyStop(checkpoints=(0.25, 0.5), top_k=2, slack=0.02)
    assert DistillSection().early_stop_kwargs(top_k=2) is None
    with pytest.raises(ValidationError, match="less than 1"):
        DistillSection(checkpoints=[0.5, 1.0])


def test_leaderboard_keeps_one_best_reward_per_architecture():
    board = RewardCache()
    assert board.kth_best(1) is None
    board.offer(0.5, "a")
    board.offer(0.7, "a")  # the same architecture again: one place, its best reward
    board.offer(0.4, "b")
    board.offer(float("nan"), "c")
    assert board.kth_best(1) == 0.7 and board.kth_best(2) == 0.4
    assert board.kth_best(3) is None
    board.offer(0.6)
    assert board.kth_best(2) == 0.6 and board.kth_best(3) == 0.4
    with pytest.raises(ValueError, match="k 0"):
        board.kth_best(0)


# --------------------------------------------------------------------------- acceptance


def _simulate(seed: int, k: int, parallel: int, total: int = 400, n: int = 200):
    """The evaluator's rule over ``n`` synthetic children arriving in random order.

    Children run ``parallel`` at a time: a child's stop decisions see only the children that
    finished before its batch started (as Ray tasks see the leaderboard). Returns each
    child's true full-budget reward, and the reward recorded for it (a lower bound when it
    was stopped) with whether it was stopped.
    """
    rng = np.random.default_rng(seed)
    settings = EarlyStop(checkpoints=(0.25, 0.5), top_k=k, slack=0.01)
    board = RewardCache()
    true, recorded, stopped = [], [], []
    for start in range(0, n, parallel):
        finished = []
        for i in range(start, min(n, start + parallel)):
            a_final = rng.uniform(0.2, TEACHER_ACC)
            tau = rng.uniform(0.05, 1.0) * total
            at = n2n_at(rng.uniform(0.0, 0.99))

            def accuracy(step, a_final=a_final, tau=tau):
                return a_final * (1.0 - math.exp(-step / tau))  # concave, rising

            true.append(at(accuracy(total)))
            curve = []
            for step in settings.checkpoint_steps(total):
                curve.append((step, accuracy(step)))
                if should_stop(curve, total, at, board.kth_best(k), settings):
                    recorded.append(at(curve[-1][1]))
                    stopped.append(True)
                    break
            else:
                recorded.append(true[-1])
                stopped.append(False)
                finished.append((f"child-{i}", true[-1]))
        for key, reward in finished:
            board.offer(reward, key)
    return np.array(true), np.array(recorded), np.array(stopped)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("parallel", [1, 4])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_early_stopping_never_drops_a_top_k_child(seed, k, parallel):
    true, recorded, stopped = _simulate(seed, k, parallel)
    top_k = set(np.argsort(-true)[:k])
    full = np.flatnonzero(~stopped)
    assert top_k == set(full[np.argsort(-true[full])[:k]])  # none of the top-k was stopped
    # a stopped child's recorded reward is a lower bound, so ranking by the recorded
    # rewards (as the fine-tuning's top_candidates does) finds the same top-k
    assert top_k == set(np.argsort(-recorded)[:k])
    assert np.all(recorded[stopped] <= true[stopped])
    assert np.all(recorded[~stopped] == true[~stopped])
    assert stopped.mean() > 0.5  # the rule does stop: most children here are hopeless


# --------------------------------------------------------------------------- real training


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One PyTorch thread: the test machine's two cores are shared with other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher_dir(digits_teacher_dir):
    return digits_teacher_dir


@pytest.fixture(scope="module")
def teacher(teacher_dir, digits):
    return load_teacher(teacher_dir, digits)


def _reduced(teacher):
    return make_child(teacher.model, teacher.spec, remove=["features.6"], ratios={"hidden": 0.5})[0]


def test_distill_measures_checkpoints_and_stops_when_told(teacher, digits):
    logits = teacher_logits(teacher.model, digits.train[0])
    cfg = KDSettings(steps=40, lr=0.05)
    plain = distill(_reduced(teacher), *digits.train, logits, *digits.val, cfg)

    seen = []
    watched = distill(
        _reduced(teacher), *digits.train, logits, *digits.val, cfg,
        checkpoints=[10, 20], on_checkpoint=lambda s, a: seen.append((s, a)) is not None,
    )  # fmt: skip
    # measuring does not change training: same final accuracy and loss as without
    assert not watched.stopped_early and watched.steps == 40
    assert watched.accuracy == plain.accuracy and watched.final_loss == plain.final_loss
    assert [s for s, _ in watched.curve] == [10, 20] and watched.curve == seen
    assert watched.curve[0][1] < watched.curve[1][1] <= watched.accuracy + 0.02

    stopped = distill(
        _reduced(teacher), *digits.train, logits, *digits.val, cfg,
        checkpoints=[10, 20], on_checkpoint=lambda s, a: True,
    )  # fmt: skip
    assert stopped.stopped_early and stopped.steps == 10
    assert stopped.curve == watched.curve[:1] and stopped.accuracy == stopped.curve[0][1]
    assert stopped.accuracy < plain.accuracy

    with pytest.raises(ValueError, match=r"checkpoints \[40\] must be steps in \[1, 40\)"):
        distill(_reduced(teacher), *digits.train, logits, *digits.val, cfg, checkpoints=[40])


def test_env_gives_each_child_a_picklable_reward_at(teacher_dir):
    seen: list[Child] = []

    class Recorder:
        teacher_accuracy = 0.9

        def evaluate(self, child: Child) -> ChildResult:
            seen.append(child)
            return ChildResult(accuracy=0.8)

    env = RemovalEnv({"teacher": str(teacher_dir), "evaluator": Recorder()})
    env.reset(seed=0)
    _, reward, *_, info = env.step([0, 1, 0, 1, 0])
    at = pickle.loads(pickle.dumps(seen[0].reward_at))
    assert at(0.8) == pytest.approx(reward) and reward > 0
    assert at(0.9) > at(0.8) > at(0.1)
    c = info["compression"]
    assert at(0.45) == pytest.approx(c * (2 - c) * 0.5)


def _child(teacher, **surgery) -> Child:
    """A child as the envs build it, with the n2n reward at the teacher's accuracy."""
    model, spec = make_child(teacher.model, teacher.spec, **surgery)
    costs = model_costs(model, (1, 8, 8))
    teacher_costs = model_costs(teacher.model, (1, 8, 8))
    template = ChildScore(0.0, 0.95, costs.params, teacher_costs.params)
    at = functools.partial(reward_at, n2n_reward, template)
    return Child(model, spec, arch_hash(spec), costs.params, costs.flops, costs.size_bytes, "t", at)


@pytest.mark.parametrize("local", [True, False], ids=["local", "ray"])
def test_evaluator_stops_a_child_that_cannot_reach_the_top_k(teacher_dir, teacher, local, request):
    if not local:
        request.getfixturevalue("ray_cluster")
    ev = KDEvaluator(
        teacher=teacher_dir,
        distill={"steps": 40, "lr": 0.05},
        local=local,
        early_stop={"checkpoints": [0.25, 0.5], "top_k": 1},
        cache_name=f"test-{uuid.uuid4().hex}",
    )
    try:
        # The leaderboard is empty: a full evaluation, which enters it.
        first = _child(teacher, remove=["features.6"], ratios={"hidden": 0.5})
        good = ev.evaluate(first)
        assert good.error is None and good.kd_steps == 40
        assert good.extra["early_stopped"] is False
        assert [s for s, _ in good.extra["curve"]] == [10, 20]
        # Keeping every unit compresses nothing: reward 0 at any accuracy, below the best.
        same = _child(teacher, ratios={"features.0": 1.0})
        hopeless = ev.evaluate(same)
        assert hopeless.error is None and hopeless.kd_steps == 10
        assert hopeless.extra["early_stopped"] is True
        assert hopeless.extra["reward_bound"] == "lower"
        assert hopeless.extra["accuracy_upper_bound"] == 1.0  # decided on one point
        assert hopeless.extra["kth_best"] == pytest.approx(first.reward_at(good.accuracy))
        assert hopeless.accuracy == hopeless.extra["curve"][-1][1]
        # A stopped child's cached result keeps saying it is a lower bound.
        again = ev.evaluate(same)
        assert again.cache_hit and again.extra["early_stopped"] is True
    finally:
        ev.close()


def test_evaluator_with_too_few_finished_children_never_stops(teacher_dir, teacher):
    ev = KDEvaluator(
        teacher=teacher_dir, distill={"steps": 40, "lr": 0.05}, local=True,
        early_stop={"top_k": 2},
    )  # fmt: skip
    for surgery in ({"remove": ["features.6"], "ratios": {"hidden": 0.5}}, {"ratios": {}}):
        result = ev.evaluate(_child(teacher, **surgery))
        assert result.kd_steps == 40 and result.extra["early_stopped"] is False
    with pytest.raises(ValueError, match="early_stop needs cache=True"):
        KDEvaluator(teacher=teacher_dir, cache=False, early_stop={})


def test_env_records_a_stopped_child_as_a_lower_bound(teacher_dir):
    ev = KDEvaluator(
        teacher=teacher_dir, distill={"steps": 40, "lr": 0.05}, local=True,
        early_stop={"top_k": 1},
    )  # fmt: skip
    env = RemovalEnv({"teacher": str(teacher_dir), "evaluator": ev})
    env.reset(seed=0)
    _, reward, *_, info = env.step([0, 1, 0, 0, 0])
    assert reward > 0 and child_row(info)["early_stopped"] is False
    _, reward, *_, info = env.step([0, 0, 0, 0, 0])  # keep all: reward 0 whatever it learns
    row = child_row(info)
    assert row["early_stopped"] is True and row["kd_steps"] == 10 and reward == 0.0
    assert info["extra_reward_bound"] == "lower"
