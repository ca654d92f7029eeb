"""The RLModules on the environments' spaces alone: shapes, distributions, conditioning."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import TARGET_NETWORK_ACTION_DIST_INPUTS

from envs.env import RemovalEnv, ShrinkageEnv
from envs.evaluation import SyntheticEvaluator
from envs.graph import COL, NUM_FEATURES
from pipeline.search.policies import StepLSTMModule, UnitLSTMModule, module_spec

UNITS = 7
OBS = gym.spaces.Box(0.0, 1.0, (UNITS, NUM_FEATURES), np.float32)
ADDRESSED = [1, 2, 4, 5]


def observations(batch: int, column: int = COL["removable"], seed: int = 0) -> torch.Tensor:
    """Random descriptors whose ``column`` marks the units in ADDRESSED."""
    obs = torch.rand(batch, UNITS, NUM_FEATURES, generator=torch.Generator().manual_seed(seed))
    obs[..., column] = 0.0
    obs[:, ADDRESSED, column] = 1.0
    return obs


def unit_module(choices: int, autoregressive: bool, **config: object) -> UnitLSTMModule:
    torch.manual_seed(0)
    space = gym.spaces.MultiDiscrete([choices] * len(ADDRESSED))
    model_config = {"hidden": 8, "autoregressive": autoregressive, **config}
    return UnitLSTMModule(observation_space=OBS, action_space=space, model_config=model_config)


@pytest.mark.parametrize("autoregressive", [False, True])
def test_unit_policy_emits_one_logit_set_per_addressed_unit(autoregressive: bool) -> None:
    module = unit_module(3, autoregressive, mask_column=COL["removable"])
    obs = observations(5)
    out = module.forward_exploration({Columns.OBS: obs})
    assert out[Columns.ACTION_DIST_INPUTS].shape == (5, len(ADDRESSED) * 3)
    dist = module.get_exploration_action_dist_cls().from_logits(out[Columns.ACTION_DIST_INPUTS])
    actions = out.get(Columns.ACTIONS, dist.sample())
    assert actions.shape == (5, len(ADDRESSED))
    assert all(module.action_space.contains(a.numpy()) for a in actions)
    assert module.compute_values({Columns.OBS: obs}).shape == (5,)
    # The mask column and explicit unit indices address the same units.
    by_index = unit_module(3, autoregressive, action_units=ADDRESSED)
    by_index.load_state_dict(module.state_dict())
    batch = {Columns.OBS: obs, Columns.ACTIONS: actions}
    torch.testing.assert_close(
        module.forward_train(batch)[Columns.ACTION_DIST_INPUTS],
        by_index.forward_train(batch)[Columns.ACTION_DIST_INPUTS],
    )


def test_removal_policy_starts_near_uniform_and_greedy_inference_is_deterministic() -> None:
    module = unit_module(2, False, mask_column=COL["removable"])
    obs = observations(4)
    logits = module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
    probs = torch.softmax(logits.view(4, len(ADDRESSED), 2), -1)
    assert torch.allclose(probs, torch.full_like(probs, 0.5), atol=0.05)
    dist = module.get_inference_action_dist_cls().from_logits(logits).to_deterministic()
    assert torch.equal(dist.sample(), dist.sample())


def test_autoregressive_logp_matches_teacher_forced_training_pass() -> None:
    module = unit_module(4, True, mask_column=COL["removable"])
    obs = observations(6)
    out = module.forward_exploration({Columns.OBS: obs})
    train = module.forward_train({Columns.OBS: obs, Columns.ACTIONS: out[Columns.ACTIONS]})
    dist = module.get_train_action_dist_cls().from_logits(train[Columns.ACTION_DIST_INPUTS])
    # PPO's ratio is exp(logp_train - logp_sampled): 1 before any update.
    torch.testing.assert_close(dist.logp(out[Columns.ACTIONS]), out[Columns.ACTION_LOGP])
    torch.testing.assert_close(train[Columns.ACTION_DIST_INPUTS], out[Columns.ACTION_DIST_INPUTS])


def test_autoregressive_choices_condition_later_units_only() -> None:
    module = unit_module(4, True, mask_column=COL["removable"])
    obs = observations(1).repeat(2, 1, 1)
    actions = torch.tensor([[0, 1, 2, 3], [3, 1, 2, 3]])  # differ in the first unit only
    logits = module.forward_train({Columns.OBS: obs, Columns.ACTIONS: actions})[
        Columns.ACTION_DIST_INPUTS
    ]
    per_unit = logits.view(2, len(ADDRESSED), 4)
    # The first choice sees no earlier one; the second sees the first.
    torch.testing.assert_close(per_unit[0, 0], per_unit[1, 0], atol=1e-7, rtol=0)
    assert (per_unit[0, 1] - per_unit[1, 1]).abs().max() > 1e-5


def test_mask_that_disagrees_with_the_action_is_rejected() -> None:
    module = unit_module(2, False, mask_column=COL["removable"])
    obs = observations(2)
    obs[:, 0, COL["removable"]] = 1.0  # five marked units for a four-unit action
    with pytest.raises(ValueError, match="marks"):
        module.forward_exploration({Columns.OBS: obs})
    with pytest.raises(ValueError, match="action_units"):
        unit_module(2, False)  # four of seven units addressed, no way to tell which


def test_target_network_starts_equal_to_the_policy() -> None:
    module = unit_module(3, True, mask_column=COL["removable"])
    module.make_target_networks()
    obs = observations(3)
    actions = module.forward_exploration({Columns.OBS: obs})[Columns.ACTIONS]
    batch = {Columns.OBS: obs, Columns.ACTIONS: actions}
    torch.testing.assert_close(
        module.forward_target(batch)[TARGET_NETWORK_ACTION_DIST_INPUTS],
        module.forward_train(batch)[Columns.ACTION_DIST_INPUTS],
    )
    assert len(module.get_target_network_pairs()) == 1


def test_step_policy_carries_earlier_steps_in_its_state() -> None:
    torch.manual_seed(0)
    module = StepLSTMModule(
        observation_space=OBS, action_space=gym.spaces.Discrete(5), model_config={"hidden": 8}
    )
    state = {
        k: torch.from_numpy(v).unsqueeze(0).repeat(2, 1)
        for k, v in module.get_initial_state().items()
    }
    obs = (
        observations(2, COL["shrinkable"]).unsqueeze(1).repeat(1, 3, 1, 1)
    )  # [B, T, units, features]
    obs[1, 0, :, COL["keep_ratio"]] = 0.3  # a different first step in the second sequence
    out = module.forward_train({Columns.OBS: obs, Columns.STATE_IN: state})
    logits = out[Columns.ACTION_DIST_INPUTS]
    assert logits.shape == (2, 3, 5)
    assert out[Columns.STATE_OUT]["h"].shape == (2, 8)
    assert module.compute_values({Columns.OBS: obs, Columns.STATE_IN: state}).shape == (2, 3)
    # Identical later observations, different history: the later logits differ.
    assert (logits[0, 2] - logits[1, 2]).abs().max() > 1e-5


def test_module_spec_picks_the_module_for_the_space() -> None:
    removal, connector = module_spec(
        "lstm", gym.spaces.MultiDiscrete([2] * 4), hidden=16, mask_column=3
    )
    assert removal.module_class is UnitLSTMModule and connector is None
    assert removal.model_config["hidden"] == 16
    sequential, _ = module_spec("lstm", gym.spaces.Discrete(4))
    assert sequential.module_class is StepLSTMModule
    mlp, flatten = module_spec("mlp", gym.spaces.MultiDiscrete([2] * 4), hidden=16)
    assert mlp.module_class is None  # RLlib's default module for the algorithm
    connector = flatten()
    connector.input_action_space = gym.spaces.MultiDiscrete([2] * 4)
    connector.input_observation_space = OBS
    assert connector.observation_space.shape == (UNITS * NUM_FEATURES,)
    with pytest.raises(ValueError, match="unknown policy"):
        module_spec("gru", gym.spaces.Discrete(2))


@pytest.mark.parametrize("sequential", [False, True])
def test_modules_fit_the_real_environments(sequential: bool) -> None:
    teacher = {
        "arch": "small_cnn",
        "kwargs": {"width": 0.25, "in_channels": 1},
        "input_shape": [1, 8, 8],
    }
    config = {"teacher": teacher, "evaluator": SyntheticEvaluator()}
    for env, column in (
        (RemovalEnv(config), COL["removable"]),
        (
            ShrinkageEnv({**config, "ratios": [0.5, 1.0], "sequential": sequential}),
            COL["shrinkable"],
        ),
    ):
        spec, _ = module_spec("lstm", env.action_space, hidden=8, mask_column=column)
        module = spec.module_class(
            observation_space=env.observation_space,
            action_space=env.action_space,
            model_config=spec.model_config,
        )
        obs, _ = env.reset(seed=0)
        batch = {Columns.OBS: torch.from_numpy(obs)[None]}
        if isinstance(env.action_space, gym.spaces.Discrete):
            batch[Columns.OBS] = batch[Columns.OBS][:, None]
            batch[Columns.STATE_IN] = {
                k: torch.from_numpy(v)[None] for k, v in module.get_initial_state().items()
            }
        out = module.forward_exploration(batch)
        dist = module.get_exploration_action_dist_cls().from_logits(out[Columns.ACTION_DIST_INPUTS])
        action = out.get(Columns.ACTIONS, dist.sample()).reshape(-1).numpy()
        action = int(action[0]) if isinstance(env.action_space, gym.spaces.Discrete) else action
        assert env.action_space.contains(action)
        env.step(action)
