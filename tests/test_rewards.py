"""Reward values at known points."""

from __future__ import annotations

import pytest

from envs.rewards import ChildScore, ConstrainedReward, make_reward, n2n_reward


def _score(params, accuracy=0.9, **kw):
    return ChildScore(
        accuracy=accuracy, teacher_accuracy=0.9, params=params, teacher_params=1000, **kw
    )


def test_n2n_reward_known_points():
    assert n2n_reward(_score(1000)) == 0.0  # C = 0
    assert n2n_reward(_score(100)) == pytest.approx(0.99)  # C = 0.9, A = A_teacher
    assert n2n_reward(_score(100, accuracy=0.45)) == pytest.approx(0.495)
    assert n2n_reward(_score(0)) == pytest.approx(1.0)


def test_constrained_reward_softens_over_budget():
    fn = ConstrainedReward(budgets={"flops": 0.25}, softness=2.0)
    within = _score(500, flops=200, teacher_flops=1000)
    over = _score(500, flops=500, teacher_flops=1000)
    assert fn(within) == pytest.approx(n2n_reward(within))
    assert fn(over) == pytest.approx(n2n_reward(over) * (0.25 / 0.5) ** 2)


def test_latency_budget_needs_measured_latency():
    fn = make_reward({"name": "constrained", "budgets": {"latency": 0.5}})
    with pytest.raises(ValueError, match="needs the child's measured latency"):
        fn(_score(500))
    assert fn(_score(500, latency_s=1.0, teacher_latency_s=4.0)) == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"name": "nope"}, "unknown reward 'nope'"),
        ({"name": "constrained", "budgets": {"memory": 0.5}}, "unknown budget 'memory'"),
        (
            {"name": "constrained", "budgets": {"params": 1.5}},
            r"must be a fraction of the teacher in \(0, 1\]",
        ),
    ],
)
def test_bad_reward_configs(config, message):
    with pytest.raises(ValueError, match=message):
        make_reward(config)
