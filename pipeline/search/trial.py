"""One search stage as a Ray Tune trial: RLlib PPO/APPO (or random search) over an N2N env.

A stage runs as a Tune function trainable (:func:`stage_trainable`) so that Tune gives it
checkpoints, resume after an interruption and sweeps. Inside, an RLlib algorithm on the new
API stack is trained for ``iterations`` updates of ``episodes_per_iteration`` children each;
every iteration is checkpointed (``algo.save_to_path``) and reported with the episodes RLlib
sampled against those expected, so nothing is dropped silently.

Every child an env evaluates is recorded by a :class:`ChildRecorder` wrapper into a
:class:`ChildLog` actor owned by the driver; the driver drains it after each reported
iteration (see ``pipeline.tracking.progress``) and writes ``children.csv``. The envs themselves know
nothing of this (``envs`` never imports ``pipeline``).

Settings for slow environments: one child is one env step (removal, parallel shrinkage) or
one episode (sequential shrinkage); rollouts are complete episodes, small batches (N2N used 5
per update), ``sample_timeout_s`` sized for minutes-long steps, and env runners = children
in flight. Env runners only wait on their child's Ray task, so they reserve a fraction of a
CPU; the children's own CPUs/GPUs are reserved by the evaluator's tasks.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import ray
from ray import tune

from envs.env import RemovalEnv, ShrinkageEnv

logger = logging.getLogger(__name__)

STAGES = ("removal", "shrinkage")
ENV_CLASSES = {"removal": RemovalEnv, "shrinkage": ShrinkageEnv}
LOG_KEY, TRIAL_KEY = "n2n_child_log", "n2n_trial_id"
"""env_config keys the recorder takes out before the env sees the config."""
LOG_NAMESPACE = "n2n"
RUNNER_CPUS = 0.25
"""CPU reserved per env runner and for the trial's main process: they wait, children work."""
STATE_FILE = "trial_state.json"
ON_HEAD_KEY = "node:__internal_head__"
ON_HEAD = {ON_HEAD_KEY: 0.001}
"""Custom resource that only Ray's head node has (Ray Train pins its state actor with it). The
trial's main process and its env runners request it, so they live on the head with the driver
and only child tasks go to worker nodes: a lost worker node costs children, which the evaluator
retries, never the search itself. They reserve ``RUNNER_CPUS`` each where the head has that
many CPUs, and none on a head started with ``num-cpus: 0`` (the chart's: there only the driver
and the search run on the head), see :func:`runner_cpus`."""


def runner_cpus(env_runners: int) -> float:
    """CPUs each of a trial's processes (main + env runners) reserves on the head node.

    ``RUNNER_CPUS`` when the head can hold them all, so that children (which may also run on
    the head of a local cluster) do not oversubscribe it; 0 on a head with too few CPUs (a
    KubeRay head with ``num-cpus: 0`` takes no Ray work but the search's, so nothing competes).
    Before Ray starts (a dry config), ``RUNNER_CPUS``.
    """
    if not ray.is_initialized():
        return RUNNER_CPUS
    heads = [n for n in ray.nodes() if n.get("Alive") and ON_HEAD_KEY in n.get("Resources", {})]
    cpus = heads[0]["Resources"].get("CPU", 0.0) if heads else 0.0
    return RUNNER_CPUS if cpus + 1e-9 >= RUNNER_CPUS * (env_runners + 1) else 0.0


# --------------------------------------------------------------------------- child records


@ray.remote(num_cpus=0)
class ChildLog:
    """Collects child records from env runners, per Tune trial, until the driver drains them."""

    def __init__(self) -> None:
        self._rows: dict[str, list[dict[str, Any]]] = {}

    def append(self, trial_id: str, row: dict[str, Any]) -> None:
        self._rows.setdefault(trial_id, []).append(row)

    def drain(self, trial_id: str | None = None) -> list[dict[str, Any]]:
        """Returns and forgets the records of one trial (or of all trials)."""
        if trial_id is not None:
            return self._rows.pop(trial_id, [])
        rows = [r for rs in self._rows.values() for r in rs]
        self._rows.clear()
        return rows


def child_log(name: str) -> ray.actor.ActorHandle:
    """The named :class:`ChildLog` of a run, created if absent (owned by the caller).

    It lives on the head node: a record must outlive any worker node.
    """
    return ChildLog.options(
        name=name, namespace=LOG_NAMESPACE, get_if_exists=True, resources=ON_HEAD
    ).remote()


def child_row(info: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able record of one evaluated child, from the env's step ``info``."""
    keys = (
        "stage", "action", "arch_hash", "params", "flops", "size_bytes", "compression", "accuracy",
        "reward", "wall_time_s", "cache_hit", "error", "kd_steps", "removed", "dropped", "ratios",
        "spec",
    )  # fmt: skip
    row = {k: info.get(k) for k in keys}
    # Stopped early by pipeline.children.early_stop: accuracy and reward are then lower bounds.
    row["early_stopped"] = bool(info.get("extra_early_stopped", False))
    # Times the child's task was lost with its worker or node and run again (pipeline.children.evaluator).
    row["retries"] = int(info.get("extra_retries") or 0)
    row["action"] = [int(a) for a in (row["action"] or [])]
    for key in ("compression", "accuracy", "reward", "wall_time_s"):
        if row[key] is not None:
            row[key] = float(row[key])
    return row


class ChildRecorder(gym.Wrapper):
    """Sends every child the wrapped env evaluates to the run's :class:`ChildLog`."""

    def __init__(self, env: gym.Env, log_name: str, trial_id: str) -> None:
        super().__init__(env)
        self._log_name, self._trial_id = log_name, trial_id
        self._log: ray.actor.ActorHandle | None = None

    def step(self, action: Any):  # noqa: ANN201 (Gymnasium's 5-tuple)
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated and "reward" in info:
            try:
                if self._log is None:
                    self._log = ray.get_actor(self._log_name, namespace=LOG_NAMESPACE)
                # Synchronous: when an iteration returns, its children are in the log.
                ray.get(self._log.append.remote(self._trial_id, child_row(info)))
            except Exception as err:  # the driver went away: keep training, lose the record
                logger.warning("could not record child in %s: %s", self._log_name, err)
        return obs, reward, terminated, truncated, info


def make_env(stage: str, env_config: dict[str, Any]) -> gym.Env:
    """The stage's env, wrapped in a :class:`ChildRecorder` when the config names a log."""
    config = dict(env_config)
    log_name, trial_id = config.pop(LOG_KEY, None), config.pop(TRIAL_KEY, "")
    env = ENV_CLASSES[stage](config)
    return ChildRecorder(env, log_name, trial_id) if log_name else env


def register_envs() -> dict[str, str]:
    """Registers ``n2n-removal-recorded`` / ``n2n-shrinkage-recorded`` with RLlib."""
    from ray.tune.registry import register_env

    names = {}
    for stage in STAGES:
        names[stage] = f"n2n-{stage}-recorded"
        register_env(names[stage], lambda cfg, stage=stage: make_env(stage, cfg))
    return names


# --------------------------------------------------------------------------- RLlib


def episode_length(stage: str, env_config: dict[str, Any], units: int | None) -> int:
    """Env steps per episode: 1, or one per shrinkable unit in sequential shrinkage."""
    if stage == "shrinkage" and env_config.get("sequential"):
        if not units:
            raise ValueError("sequential shrinkage needs the number of shrinkable units")
        return units
    return 1


def algo_config(settings: dict[str, Any], env_config: dict[str, Any] | None = None) -> Any:
    """The RLlib ``AlgorithmConfig`` of a stage trial's settings (see :func:`stage_settings`)."""
    from ray.rllib.algorithms.appo import APPOConfig
    from ray.rllib.algorithms.ppo import PPOConfig

    from envs.graph import COL
    from pipeline.search.policies import module_spec

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
            minibatch_size=batch, num_epochs=s["num_epochs"], lambda_=1.0, use_kl_loss=False
        )
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
    """What a stage trial reserves: its main process plus one bundle per env runner."""
    if settings["algo"] == "random":
        return tune.PlacementGroupFactory(
            [{"CPU": settings.get("runner_cpus", RUNNER_CPUS), **ON_HEAD}]
        )
    config = algo_config(settings)
    return config.algo_class.default_resource_request(config)


def _iteration_metrics(result: dict[str, Any], expected: int) -> dict[str, Any]:
    runners = result.get("env_runners", {})
    return {
        "episodes": int(runners.get("num_episodes", 0) or 0),
        "episodes_expected": expected,
        "reward_mean": _num(runners.get("episode_return_mean")),
        "reward_max": _num(runners.get("episode_return_max")),
        "reward_min": _num(runners.get("episode_return_min")),
    }


def _num(value: Any) -> float:
    return float(value) if value is not None and np.isfinite(value) else float("nan")


def stage_trainable(config: dict[str, Any]) -> None:
    """Tune function trainable: runs one search stage, checkpointing every iteration.

    ``config["settings"]`` holds the stage settings built by :func:`stage_settings` (one
    variant of a sweep). On restore, the algorithm and the iteration counter come
    back from the trial's latest checkpoint.
    """
    settings = dict(config["settings"])
    env_config = dict(settings["env_config"])
    env_config[TRIAL_KEY] = tune.get_context().get_trial_id() or ""
    if settings["algo"] == "random":
        from pipeline.search.random_search import random_search

        random_search(settings, env_config)
        return
    algo = algo_config(settings, env_config).build_algo()
    start, best = 0, float("-inf")
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            algo.restore_from_path(Path(folder) / "algo")
            state = json.loads((Path(folder) / STATE_FILE).read_text())
        start, best = state["iteration"], state["best_reward"]
        logger.info("restored %s trial at iteration %d", settings["stage"], start)
    try:
        for iteration in range(start + 1, settings["iterations"] + 1):
            result = algo.train()
            metrics = _iteration_metrics(result, settings["episodes_per_iteration"])
            if np.isfinite(metrics["reward_max"]):
                best = max(best, metrics["reward_max"])
            metrics.update(
                iteration=iteration, iterations_total=settings["iterations"], best_reward=best
            )
            with tempfile.TemporaryDirectory() as folder:
                algo.save_to_path(Path(folder) / "algo")
                state = {"iteration": iteration, "best_reward": best}
                (Path(folder) / STATE_FILE).write_text(json.dumps(state))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
    finally:
        algo.stop()


def stage_settings(
    stage: str,
    search: Any,
    stage_cfg: Any,
    env_config: dict[str, Any],
    units: int,
    choices: int,
    seed: int,
    log_name: str,
    sample_timeout_s: float,
) -> dict[str, Any]:
    """The JSON-able settings of one stage trial (Tune's ``param_space``).

    Args:
        stage: ``"removal"`` or ``"shrinkage"``.
        search: the run's ``SearchConfig``.
        stage_cfg: the run's ``StageConfig`` for this stage.
        env_config: the env's config (teacher, evaluator, reward, shrinkage options).
        units: units the action addresses (removable or shrinkable units).
        choices: choices per unit (2 for removal, the number of ratios for shrinkage).
        seed: the run's seed.
        log_name: name of the run's :class:`ChildLog` actor.
        sample_timeout_s: RLlib's wait for one iteration's rollouts (``RunConfig.rollout_timeout_s``).
    """
    return {
        "stage": stage,
        "algo": search.algo,
        "policy": search.policy,
        "hidden": search.hidden,
        "env_runners": search.env_runners,
        "runner_cpus": runner_cpus(search.env_runners),
        "sample_timeout_s": sample_timeout_s,
        "iterations": stage_cfg.iterations,
        "episodes_per_iteration": stage_cfg.episodes_per_iteration,
        "lr": stage_cfg.lr,
        "entropy_coeff": stage_cfg.entropy_coeff,
        "num_epochs": stage_cfg.num_epochs,
        "seed": seed,
        "units": units,
        "choices": choices,
        "episode_length": episode_length(stage, env_config, units),
        "env_config": {**env_config, LOG_KEY: log_name},
    }


# --------------------------------------------------------------------------- Tune


class SearchError(RuntimeError):
    """A stage trial failed; the message is the trial's error, in one line."""


def _resources(config: dict[str, Any]) -> tune.PlacementGroupFactory:
    return trial_resources(config["settings"])


def run_stage(
    name: str,
    variants: list[dict[str, Any]],
    storage_path: str,
    callbacks: list[Any],
    resume: bool = False,
    scheduler: Any = None,
    max_concurrent: int = 1,
) -> tune.ResultGrid:
    """Runs stage trials under Ray Tune (one trial per settings variant), or resumes them.

    Args:
        name: Tune experiment name (a folder under ``storage_path``).
        variants: trial settings (see :func:`stage_settings`); several make a sweep.
        storage_path: Tune storage, a local folder or a URI such as ``s3://bucket/path``.
        callbacks: Tune callbacks (progress, MLflow).
        resume: restore the experiment at ``storage_path/name`` when it exists; its trials
            continue from their latest checkpoints.
        scheduler: a Tune trial scheduler (ASHA) for sweeps.
        max_concurrent: trials running at once.

    Raises:
        SearchError: a trial failed.
    """
    trainable = tune.with_resources(stage_trainable, _resources)
    space = {"settings": variants[0] if len(variants) == 1 else tune.grid_search(variants)}
    path = f"{storage_path.rstrip('/')}/{name}"
    if resume and tune.Tuner.can_restore(path):
        logger.info("resuming Tune experiment %s", path)
        tuner = tune.Tuner.restore(
            path, trainable, resume_unfinished=True, resume_errored=True, param_space=space
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                scheduler=scheduler,
                max_concurrent_trials=max_concurrent,
                metric="reward_mean" if scheduler is not None else None,
                mode="max" if scheduler is not None else None,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                callbacks=callbacks,
                verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
    results = tuner.fit()
    # Tune catches SIGINT, saves the experiment and returns normally, marking the stopped
    # trials TERMINATED in memory only: the saved state tells an interruption apart.
    saved = tune.ExperimentAnalysis(path).trials
    if any(trial.status not in ("TERMINATED", "ERROR") for trial in saved):
        raise KeyboardInterrupt(f"{name} search interrupted; its Tune state is saved in {path}")
    if results.errors:
        err = results.errors[0]
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        raise SearchError(f"{name} trial failed: {lines[-1] if lines else type(err).__name__}")
    return results
