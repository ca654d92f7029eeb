"""The RLlib side of a stage trial: the ``AlgorithmConfig`` of PPO or APPO with N2N's policies,
the resources a trial reserves, and the metrics of each iteration.

Settings for slow environments: one child is one env step (removal, parallel shrinkage) or
one episode (sequential shrinkage); rollouts are complete episodes, small batches (N2N used 5
per update), ``sample_timeout_s`` sized for minutes-long steps, and env runners = children
in flight. Env runners only wait on their child's Ray task, so they reserve a fraction of a
CPU; the children's own CPUs/GPUs are reserved by the evaluator's tasks.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
from ray import tune
from ray.rllib.algorithms.appo import APPOConfig
from ray.rllib.algorithms.ppo import PPOConfig

from envs.graph import COL
from pipeline.search.learner import APPROX_KL, CLIP_FRACTION, DiagnosedPPOLearner
from pipeline.search.policies import module_spec
from pipeline.search.random_search import random_workers
from pipeline.search.records import ON_HEAD, RUNNER_CPUS, register_envs


def episode_length(stage: str, env_config: dict[str, Any], units: int | None) -> int:
    """Env steps per episode: 1, or one per shrinkable unit in sequential shrinkage."""
    if stage == "shrinkage" and env_config.get("sequential"):
        if not units:
            raise ValueError("sequential shrinkage needs the number of shrinkable units")
        return units
    return 1


def algo_config(settings: dict[str, Any], env_config: dict[str, Any] | None = None) -> Any:
    """The RLlib ``AlgorithmConfig`` of a stage trial's settings (see :func:`stage_settings`)."""
    s = settings
    env_config = env_config if env_config is not None else s["env_config"]
    stage = s["stage"]
    space = _action_space(s)
    column = COL["removable"] if stage == "removal" else COL["shrinkable"]
    spec, connector = module_spec(
        s["policy"],
        space,
        hidden=s["hidden"],
        mask_column=column,
        autoregressive=stage == "shrinkage",
    )
    steps = s["episode_length"]
    batch = s["episodes_per_iteration"] * steps
    runners = s["env_runners"]
    cpus = s.get("runner_cpus", RUNNER_CPUS)
    config = (APPOConfig() if s["algo"] == "appo" else PPOConfig()).environment(
        env=register_envs()[stage], env_config=env_config, disable_env_checking=True
    )
    config = (
        config.env_runners(
            num_env_runners=0 if runners == 1 else runners,
            num_envs_per_env_runner=1,
            num_cpus_per_env_runner=cpus,
            custom_resources_per_env_runner=ON_HEAD,
            rollout_fragment_length=max(1, math.ceil(batch / runners))
            if s["algo"] == "ppo"
            else steps,
            batch_mode="complete_episodes",
            sample_timeout_s=s["sample_timeout_s"],
            env_to_module_connector=connector,
        )
        .learners(num_learners=0, num_cpus_per_learner=cpus)
        .resources(num_cpus_for_main_process=cpus, custom_resources_for_main_process=ON_HEAD)
        .rl_module(rl_module_spec=spec)
        .training(
            lr=s["lr"],
            gamma=1.0,
            train_batch_size_per_learner=batch,
            entropy_coeff=s["entropy_coeff"],
        )
        .reporting(
            min_time_s_per_iteration=0,
            min_sample_timesteps_per_iteration=batch,
            metrics_num_episodes_for_smoothing=s["episodes_per_iteration"],
        )
        .debugging(seed=s["seed"], log_level="ERROR")
    )
    if s["algo"] == "ppo":
        # Clipping alone bounds each update; PPO's adaptive KL penalty would slow a search
        # that gets only a few dozen episodes in all.
        config = config.training(
            minibatch_size=batch,
            num_epochs=s["num_epochs"],
            lambda_=1.0,
            use_kl_loss=False,
        ).learners(learner_class=DiagnosedPPOLearner)
    else:
        config = config.training(
            vtrace=True, use_kl_loss=False, circular_buffer_iterations_per_batch=s["num_epochs"]
        )
    return config


def _action_space(settings: dict[str, Any]) -> gym.Space:
    if settings["stage"] == "shrinkage" and settings["env_config"].get("sequential"):
        return gym.spaces.Discrete(len(settings["env_config"]["ratios"]))
    return gym.spaces.MultiDiscrete([settings["choices"]] * settings["units"])


def trial_resources(settings: dict[str, Any]) -> tune.PlacementGroupFactory:
    """What a stage trial reserves: its main process plus one bundle per env runner (random
    search's env workers too)."""
    if settings["algo"] == "random":
        bundle = {"CPU": settings.get("runner_cpus", RUNNER_CPUS), **ON_HEAD}
        return tune.PlacementGroupFactory([bundle] * (1 + random_workers(settings)))
    config = algo_config(settings)
    return config.algo_class.default_resource_request(config)


LEARNER_METRICS = {
    "entropy": "entropy", APPROX_KL: APPROX_KL, CLIP_FRACTION: CLIP_FRACTION,
    "vf_explained_var": "vf_explained_var", "policy_loss": "policy_loss", "vf_loss": "vf_loss",
}  # fmt: skip
"""The learner's health as RLlib (and :class:`DiagnosedPPOLearner`) reports it, by the name
each iteration's record gives it (``learner_<name>``)."""


def iteration_metrics(result: dict[str, Any], expected: int) -> dict[str, Any]:
    """One iteration's record: episodes sampled against expected, the rewards, and the
    learner's entropy, approximate KL, clip fraction and value-function explained variance."""
    runners = result.get("env_runners", {})
    learner = (result.get("learners") or {}).get("default_policy") or {}
    return {
        "episodes": int(runners.get("num_episodes", 0) or 0),
        "episodes_expected": expected,
        "reward_mean": _num(runners.get("episode_return_mean")),
        "reward_max": _num(runners.get("episode_return_max")),
        "reward_min": _num(runners.get("episode_return_min")),
        **{f"learner_{name}": _num(learner.get(key)) for name, key in LEARNER_METRICS.items()},
    }


def _num(value: Any) -> float:
    return float(value) if value is not None and np.isfinite(value) else float("nan")
