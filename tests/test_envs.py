"""The two Gymnasium environments: spaces, check_env, info, failures and bad actions."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from envs import RemovalEnv, ShrinkageEnv, SyntheticEvaluator
from envs.graph import COL
from envs.spec import base_spec

TEACHER = base_spec("small_cnn", [1, 8, 8])


def _config(**extra):
    return {"teacher": TEACHER, "evaluator": SyntheticEvaluator(important=["features.3"]), **extra}


@pytest.mark.parametrize(
    "make",
    [
        lambda: RemovalEnv(_config()),
        lambda: ShrinkageEnv(_config()),
        lambda: ShrinkageEnv(_config(sequential=True, ratios=[0.25, 0.5, 1.0])),
    ],
    ids=["removal", "shrinkage", "shrinkage-sequential"],
)
def test_check_env_passes(make):
    check_env(make(), skip_render_check=True)


def test_removal_env_spaces_and_info():
    env = RemovalEnv(_config())
    obs, _ = env.reset(seed=0)
    assert env.units == ["features.3", "features.6", "features.10", "features.13", "hidden"]
    assert list(env.action_space.nvec) == [2] * 5
    assert obs.shape == env.observation_space.shape == (7, len(COL))
    assert obs[:, COL["removable"]].tolist() == [0, 1, 1, 1, 1, 1, 0]
    _, reward, terminated, truncated, info = env.step([0, 0, 0, 0, 0])
    assert (terminated, truncated) == (True, False)
    assert reward == 0.0 and info["compression"] == 0.0  # keep-all: C = 0 gives R = 0
    _, reward, _, _, info = env.step([0, 1, 0, 1, 1])
    assert info["removed"] == ["features.6", "features.13", "hidden"]
    assert info["params"] < env.teacher_costs.params and info["flops"] < env.teacher_costs.flops
    c = info["compression"]
    assert reward == pytest.approx(c * (2 - c) * 0.9 / 0.9)
    assert info["error"] is None and len(info["arch_hash"]) == 16
    # Removing an "important" unit costs accuracy in the synthetic evaluator.
    _, reward_bad, _, _, info_bad = env.step([1, 1, 0, 1, 1])
    assert info_bad["accuracy"] == pytest.approx(0.6) and reward_bad < reward


def test_shrinkage_env_parallel_and_sequential_agree():
    parallel = ShrinkageEnv(_config(ratios=[0.25, 0.5, 1.0]))
    sequential = ShrinkageEnv(_config(ratios=[0.25, 0.5, 1.0], sequential=True))
    assert parallel.units == sequential.units == [
        "features.0", "features.3", "features.6", "features.10", "features.13", "hidden"
    ]  # fmt: skip
    choice = [0, 2, 1, 1, 2, 0]
    _, r_par, _, _, info_par = parallel.step(choice)
    obs, _ = sequential.reset(seed=1)
    rows = [i for i, u in enumerate(sequential.architecture.units) if u.shrinkable]
    for step, c in enumerate(choice):
        assert obs[rows[step], COL["cursor"]] == 1.0 and obs[:, COL["cursor"]].sum() == 1.0
        obs, r_seq, terminated, _, info_seq = sequential.step(c)
        assert terminated == (step == len(choice) - 1)
        if not terminated:
            assert r_seq == 0.0
            assert obs[rows[step], COL["keep_ratio"]] == [0.25, 0.5, 1.0][c]
    assert r_seq == pytest.approx(r_par)
    assert info_seq["arch_hash"] == info_par["arch_hash"]
    assert info_par["spec"]["channels"]["features.0"] == 8  # 0.25 * 32


def test_a_budget_caps_each_shrinkage_action_at_the_highest_level_that_fits():
    ratios = [0.25, 0.5, 0.75, 1.0]
    free = ShrinkageEnv(_config(ratios=ratios))
    wide = [3, 3, 1, 3, 0, 3]
    *_, info = free.step(wide)
    limit = info["params"] // 3
    env = ShrinkageEnv(_config(ratios=ratios, limits={"params": limit}))
    *_, info = env.step(wide)
    taken = info["action"]
    assert info["params"] <= limit < free.teacher_costs.params
    # Capped at one common level: what was below it stays the policy's choice ...
    level = max(taken)
    assert taken == [min(v, level) for v in wide] and level < 3
    # ... and the next level up would not have fitted.
    *_, above = free.step([min(v, level + 1) for v in wide])
    assert above["params"] > limit
    assert info["ratios"] == {u: ratios[v] for u, v in zip(env.units, taken, strict=True)}
    # An action that fits is left alone; a budget nothing fits takes the lowest ratios.
    *_, small = env.step([0, 1, 0, 0, 0, 0])
    assert small["action"] == [0, 1, 0, 0, 0, 0]
    tiny = ShrinkageEnv(_config(ratios=ratios, limits={"params": 10}))
    *_, floor = tiny.step(wide)
    assert floor["action"] == [0] * 6 and floor["params"] > 10


def test_a_budget_shrinks_each_removal_child_uniformly_to_the_highest_ratio_that_fits():
    ratios = [0.25, 0.5, 0.75, 1.0]
    free = RemovalEnv(_config())
    mask = [0, 1, 0, 0, 1]  # features.6 and hidden removed
    *_, unshrunk = free.step(mask)
    limit = unshrunk["params"] // 3
    env = RemovalEnv(_config(ratios=ratios, limits={"params": limit}))
    *_, info = env.step(mask)
    assert info["removed"] == unshrunk["removed"] and info["error"] is None
    assert info["params"] <= limit
    # One keep-ratio for every shrinkable unit of the removal child, the highest that fits.
    (level,) = set(info["ratios"].values())
    assert level < 1.0
    shrink = ShrinkageEnv(_config(ratios=ratios, start=info["spec"] | {"channels": {}}))
    assert set(info["ratios"]) == set(shrink.units)
    above = ratios[ratios.index(level) + 1]
    *_, wider = shrink.step([ratios.index(above)] * len(shrink.units))
    assert wider["params"] > limit
    *_, same = shrink.step([ratios.index(level)] * len(shrink.units))
    assert same["arch_hash"] == info["arch_hash"]  # rebuilt in two steps, the same child
    # A removal child that fits already is left as it is.
    *_, loose = RemovalEnv(_config(ratios=ratios, limits={"params": 10**9})).step(mask)
    assert "ratios" not in loose and loose["arch_hash"] == unshrunk["arch_hash"]


def test_a_budget_check_builds_a_fitting_child_once(monkeypatch):
    from envs import env as env_module

    built = []
    real = env_module.make_child
    monkeypatch.setattr(env_module, "make_child", lambda *a, **k: built.append(1) or real(*a, **k))
    env = ShrinkageEnv(_config(ratios=[0.25, 0.5, 1.0], limits={"params": 10**9}))
    *_, info = env.step([2, 1, 0, 2, 1, 0])
    assert len(built) == 1 and info["action"] == [2, 1, 0, 2, 1, 0]
    *_, again = env.step([2, 1, 0, 2, 1, 0])  # the handed-over child is not reused twice
    assert len(built) == 2 and again["arch_hash"] == info["arch_hash"]


def test_shrinkage_starts_from_a_removal_result():
    start_env = RemovalEnv(_config())
    _, _, _, _, info = start_env.step([0, 1, 0, 0, 1])
    env = ShrinkageEnv(_config(start=info["spec"]))
    assert "features.6" not in [u.name for u in env.architecture.units]
    _, _, _, _, child = env.step([env.action_space.nvec[0] - 1] * len(env.units))  # keep all
    assert child["arch_hash"] == info["arch_hash"]
    assert child["spec"]["removed"] == ["features.6", "hidden"]


def test_failed_child_gets_minus_one_with_reason():
    env = RemovalEnv({"teacher": TEACHER, "evaluator": SyntheticEvaluator(fail_on=["hidden"])})
    _, reward, _, _, info = env.step([0, 0, 0, 0, 1])
    assert reward == -1.0 and info["reward"] == -1.0
    assert info["error"].startswith("RuntimeError: synthetic failure")


class RaisingEvaluator(SyntheticEvaluator):
    def evaluate(self, child):
        raise MemoryError("CUDA out of memory (simulated in a test evaluator)")


def test_evaluator_exception_is_a_failed_child_not_a_crash():
    env = RemovalEnv({"teacher": TEACHER, "evaluator": RaisingEvaluator()})
    _, reward, _, _, info = env.step([1, 0, 0, 0, 0])
    assert reward == -1.0 and info["error"].startswith("MemoryError: CUDA out of memory")


def test_nan_accuracy_is_a_failure():
    class NaNEvaluator(SyntheticEvaluator):
        def evaluate(self, child):
            result = super().evaluate(child)
            result.accuracy = float("nan")
            return result

    env = RemovalEnv({"teacher": TEACHER, "evaluator": NaNEvaluator()})
    _, reward, _, _, info = env.step([1, 0, 0, 0, 0])
    assert reward == -1.0 and "nan" in info["error"]


def test_evaluator_by_import_path():
    env = RemovalEnv(
        {
            "teacher": TEACHER,
            "evaluator": "envs.evaluation:SyntheticEvaluator",
            "evaluator_config": {"teacher_accuracy": 0.8},
        }
    )
    assert env.teacher_accuracy == 0.8


@pytest.mark.parametrize(
    ("action", "message"),
    [
        ([0, 1, 0], r"action has length 3 but this environment expects 5"),
        ([0, 2, 0, 0, 0], r"action\[1\] = 2 is out of range"),
        ([0, -1, 0, 0, 0], r"action\[1\] = -1 is out of range"),
    ],
)
def test_bad_removal_actions(action, message):
    env = RemovalEnv(_config())
    with pytest.raises(ValueError, match=message):
        env.step(np.array(action))


def test_bad_shrinkage_config_and_actions():
    with pytest.raises(ValueError, match=r"ratio in 'ratios' 1.5 is outside \(0, 1\]"):
        ShrinkageEnv(_config(ratios=[0.5, 1.5]))
    with pytest.raises(ValueError, match=r"unknown env_config keys \['ratio'\]"):
        ShrinkageEnv(_config(ratio=[0.5]))
    env = ShrinkageEnv(_config(ratios=[0.5, 1.0]))
    with pytest.raises(ValueError, match=r"action\[0\] = 2 is out of range"):
        env.step([2, 0, 0, 0, 0, 0])


def test_rllib_style_registration(ray_cluster):
    from ray.tune.registry import ENV_CREATOR, _global_registry

    from envs import register

    removal, shrinkage = register()
    env = _global_registry.get(ENV_CREATOR, removal)(_config())
    assert isinstance(env, RemovalEnv)
    assert isinstance(_global_registry.get(ENV_CREATOR, shrinkage)(_config()), ShrinkageEnv)


def test_removal_env_leaves_out_removals_that_would_grow_the_network():
    from envs.builders import fit_arch
    from envs.surgery import make_child

    # torchvision's MobileNetV2: removing the last projection conv (96 -> 32 channels) on its
    # own would widen the 1x1 conv after it (32 -> 1280) to 96 inputs, 78,784 more params.
    base = fit_arch("torchvision.models:mobilenet_v2", {"width_mult": 0.1}, [1, 8, 8], 10)
    env = RemovalEnv({"teacher": base, "evaluator": SyntheticEvaluator()})
    grower, consumer = "features.17.conv.2", "features.18.0"
    assert env.units[-2:] == [grower, consumer]
    teacher_params = env.teacher_costs.params

    _, reward, _, _, info = env.step([0] * (len(env.units) - 2) + [1, 0])
    assert info["dropped"] == [grower] and info["removed"] == []
    assert info["params"] == teacher_params and reward == 0.0  # the teacher itself: C = 0
    assert info["action"][-2] == 1  # the action is recorded as taken

    _, reward, _, _, info = env.step([0] * (len(env.units) - 2) + [1, 1])
    assert info["dropped"] == [] and info["removed"] == [grower, consumer]
    assert info["params"] < teacher_params and reward > 0
    # The record rebuilds its child, as the run does for fine-tuning.
    _, spec = make_child(env.teacher, env.teacher_spec, remove=info["removed"])
    assert spec == info["spec"]


@pytest.mark.parametrize("stage", ["removal", "shrinkage"])
def test_a_step_leaves_the_callers_random_state_alone(stage):
    """Building a child initialises new layers (and a first build fills caches), which would
    draw from the global generators the policy samples its actions from: a replayed iteration
    could then draw other actions than the first time. A step leaves them as it found them."""
    import random

    import torch

    env = RemovalEnv(_config()) if stage == "removal" else ShrinkageEnv(_config())
    env.reset(seed=0)
    action = [1, 0, 1, 0, 1] if stage == "removal" else [0] * len(env.action_space.nvec)
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    _, reward, *_ = env.step(action)
    assert reward > 0
    after = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(after[0], expected[0]) and np.array_equal(after[1], expected[1])
    assert after[2] == expected[2]
