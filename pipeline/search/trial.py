"""One search stage as a Ray Tune trial: RLlib PPO/APPO (or random search) over an N2N env.

A stage runs as a Tune function trainable (:func:`stage_trainable`) so that Tune gives it
checkpoints, resume after an interruption and sweeps. Inside, an RLlib algorithm on the new
API stack (``pipeline.search.rllib``) is trained for ``iterations`` updates of
``episodes_per_iteration`` children each; every iteration is checkpointed
(``pipeline.search.trial_state``) and reported with the episodes RLlib sampled against those
expected, so nothing is dropped silently. Every child is recorded
(``pipeline.search.records``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from ray import tune

from pipeline.search import trial_state
from pipeline.search.random_search import random_search
from pipeline.search.records import LOG_KEY, TRIAL_KEY, runner_cpus
from pipeline.search.rllib import algo_config, episode_length, iteration_metrics, trial_resources
from pipeline.search.transfer import start_from

logger = logging.getLogger(__name__)


def stage_trainable(config: dict[str, Any]) -> None:
    """Tune function trainable: runs one search stage, checkpointing every iteration.

    ``config["settings"]`` holds the stage settings built by :func:`stage_settings` (one
    variant of a sweep). On restore, the algorithm and the iteration counter come back from
    the trial's latest checkpoint, and the replayed iteration draws the same actions.
    """
    settings = dict(config["settings"])
    env_config = dict(settings["env_config"])
    env_config[TRIAL_KEY] = tune.get_context().get_trial_id() or ""
    if settings["algo"] == "random":
        random_search(settings, env_config)
        return
    algo = algo_config(settings, env_config).build_algo()
    start, best = trial_state.restore(lambda folder: algo.restore_from_path(folder / "algo"))
    if start:
        logger.info("restored %s trial at iteration %d", settings["stage"], start)
    elif settings.get("policy_from"):
        start_from(algo, settings["policy_from"])
    try:
        for iteration in range(start + 1, settings["iterations"] + 1):
            _seed_iteration(algo, trial_state.iteration_seed(settings["seed"], iteration))
            result = algo.train()
            metrics = iteration_metrics(result, settings["episodes_per_iteration"])
            if np.isfinite(metrics["reward_max"]):
                best = max(best, metrics["reward_max"])
            metrics.update(
                iteration=iteration, iterations_total=settings["iterations"], best_reward=best
            )
            trial_state.report(
                metrics, iteration, best, lambda folder: algo.save_to_path(folder / "algo")
            )
    finally:
        algo.stop()


def _seed_iteration(algo: Any, seed: int) -> None:
    """Seeds every process that draws this iteration's random numbers: the trial's own (its
    local env runner samples the actions when there are no remote ones, and its learner
    shuffles minibatches) and each remote env runner's, each with its own seed (its index
    mixed in): runners seeded alike would draw the same actions, every child twice."""
    _seed_process(seed)
    group = getattr(algo, "env_runner_group", None)
    if group is not None and group.num_remote_env_runners() > 0:
        group.foreach_env_runner(
            lambda runner: _seed_process(trial_state.iteration_seed(seed, runner.worker_index)),
            local_env_runner=False,
        )


def _seed_process(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    policy_from: str | None = None,
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
        policy_from: the transferred policy's weights the trial starts from (``pipeline.search
            .transfer``); with ``search.freeze_policy`` its learning rate is 0, so it is only
            evaluated.
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
        "lr": 0.0 if policy_from and search.freeze_policy else stage_cfg.lr,
        "policy_from": policy_from,
        "entropy_coeff": stage_cfg.entropy_coeff,
        "num_epochs": stage_cfg.num_epochs,
        "seed": seed,
        "units": units,
        "choices": choices,
        "episode_length": episode_length(stage, env_config, units),
        "env_config": {**env_config, LOG_KEY: log_name},
    }


class SearchError(RuntimeError):
    """A stage trial failed; the message is the trial's error, in one line."""


def _resources(config: dict[str, Any]) -> tune.PlacementGroupFactory:
    return trial_resources(config["settings"])


class _Interrupted:
    def __init__(self) -> None:
        self.received = False

    def __bool__(self) -> bool:
        return self.received


@contextlib.contextmanager
def _tune_signal_handlers() -> Iterator[_Interrupted]:
    """Puts back the SIGINT and SIGUSR1 handlers that ``Tuner.fit`` replaces and leaves behind.

    Tune installs its own handler for the run and restores the previous one only when a
    signal arrives. Left installed, it would swallow the next Ctrl+C (or the SIGTERM that
    ``n2n run`` forwards to it) after the search, during fine-tuning, setting an event no one
    reads. Its handler having put the previous one back means a signal came during the run.
    """
    interrupted = _Interrupted()
    watched = [signal.SIGINT] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
    before = {sig: signal.getsignal(sig) for sig in watched}
    tune_installs = threading.current_thread() is threading.main_thread() and not int(
        os.getenv("TUNE_DISABLE_SIGINT_HANDLER", "0")
    )
    try:
        yield interrupted
    finally:
        if threading.current_thread() is threading.main_thread():
            interrupted.received = (
                tune_installs and signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
            )
            for sig, handler in before.items():
                if handler is not None:
                    signal.signal(sig, handler)


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
    with _tune_signal_handlers() as interrupted:
        results = tuner.fit()
    # Tune catches SIGINT, saves the experiment and returns normally, marking the stopped
    # trials TERMINATED in memory only: its handler having fired, or the saved state, tells
    # an interruption apart.
    saved = tune.ExperimentAnalysis(path).trials
    if interrupted or any(trial.status not in ("TERMINATED", "ERROR") for trial in saved):
        raise KeyboardInterrupt(f"{name} search interrupted; its Tune state is saved in {path}")
    if results.errors:
        err = results.errors[0]
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        raise SearchError(f"{name} trial failed: {lines[-1] if lines else type(err).__name__}")
    return results
