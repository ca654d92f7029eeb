"""``n2n sweep``: one search stage run as several Tune trials over search settings.

A sweep varies what the search does (``seed``, ``search.*``, ``removal.*``, ``shrinkage.*``,
``reward.*``), never the data, teacher or child budget, so that every trial shares one
prepared evaluator and one reward cache. Each grid combination (times
``sweep.num_samples`` seeds) is validated as a whole config before Ray starts; trials run
``sweep.max_concurrent`` at a time, with ASHA stopping weak ones early when asked. Every
child lands in ``children.csv`` (with its trial), one row per trial in ``sweep.csv``.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import ray
import yaml
from rich.console import Console

from pipeline.cluster.runtime import check_resources, init_ray
from pipeline.config.presets import validate_config
from pipeline.config.schema import ConfigError, RunConfig
from pipeline.job.context import Job
from pipeline.job.run import open_job, release
from pipeline.job.stages import best_row, env_config
from pipeline.search.records import ENV_CLASSES, STAGES
from pipeline.search.trial import run_stage, stage_settings
from pipeline.tracking.progress import StageMonitor
from pipeline.tracking.rundir import RunDir

SWEEPABLE = ("seed", "search.", "removal.", "shrinkage.", "reward.")
"""Config keys a sweep may vary: the search, not the data, teacher or child budget."""


def sweep_variants(cfg: RunConfig) -> list[tuple[str, RunConfig]]:
    """Every grid combination (times ``sweep.num_samples`` seeds) as a validated config.

    Raises:
        ConfigError: an empty sweep, a key a sweep may not vary, or a value the key rejects.
    """
    grid, repeats = cfg.sweep.grid, cfg.sweep.num_samples
    if not grid and repeats == 1:
        raise ConfigError("a sweep needs sweep.grid (or --grid key=v1,v2) or sweep.num_samples > 1")
    for key in grid:
        if not (key == "seed" or key.startswith(SWEEPABLE[1:])):
            raise ConfigError(
                f"sweep.grid key {key!r} cannot vary in a sweep (it changes the data, teacher or "
                f"child budget); sweep keys under {', '.join(SWEEPABLE)}"
            )
    base = cfg.model_dump(mode="json")
    variants = []
    for combo in itertools.product(*grid.values()):
        for repeat in range(repeats):
            raw = copy.deepcopy(base)
            parts = []
            for key, value in zip(grid, combo, strict=True):
                value = yaml.safe_load(value) if isinstance(value, str) else value
                node = raw
                *path, last = key.split(".")
                for part in path:
                    node = node.setdefault(part, {})
                node[last] = value
                parts.append(f"{key}={value}")
            if repeats > 1 and "seed" not in grid:
                raw["seed"] = cfg.seed + repeat
                parts.append(f"seed={raw['seed']}")
            variants.append((" ".join(parts), validate_config(raw)))
    return variants


def sweep(
    cfg: RunConfig,
    variants: list[tuple[str, RunConfig]],
    console: Console | None = None,
    tracker: Any = None,
    splits: Any = None,
) -> list[dict[str, Any]]:
    """Runs the first enabled stage once per variant as parallel Tune trials (ASHA optional).

    Returns one row per trial (label, episodes, mean and best reward, best compression and
    accuracy), also written to ``RUN_DIR/sweep.csv``; every child is in ``children.csv``.
    """
    run_dir = RunDir(cfg.output.run_dir)
    stage = next(s for s in STAGES if cfg.stage(s).enabled)
    owns_ray = init_ray(cfg)
    job: Job | None = None
    try:
        check_resources(cfg)
        run_dir.write_config(cfg.to_yaml())
        planned = sum(v.stage(stage).iterations for _, v in variants)
        job = open_job(cfg, run_dir, console, tracker, splits, planned)
        probe = ENV_CLASSES[stage](env_config(job, stage, None))
        units = len(probe.units)
        variant_settings = []
        for label, variant in variants:
            config = env_config(job, stage, None, variant)
            choices = 2 if stage == "removal" else len(variant.shrinkage.ratios)
            settings = stage_settings(
                stage,
                variant.search,
                variant.stage(stage),
                config,
                units,
                choices,
                variant.seed,
                job.log_name,
                variant.rollout_timeout_s(stage),
            )
            variant_settings.append({**settings, "label": label})
        scheduler = None
        if cfg.sweep.scheduler == "asha" and len(variants) > 1:
            from ray.tune.schedulers import ASHAScheduler

            max_t = max(v.stage(stage).iterations for _, v in variants)
            scheduler = ASHAScheduler(
                time_attr="iteration", max_t=max_t, grace_period=min(cfg.sweep.grace_period, max_t)
            )
        monitor = StageMonitor(
            stage, job.log, run_dir, job.clock, console, tracker, per_trial_names=True
        )
        callbacks = [monitor.callback()]
        job.say(
            f"[bold]sweep[/] of {stage}: {len(variants)} trials, {cfg.sweep.max_concurrent} at once"
        )
        results = run_stage(
            f"sweep-{stage}", variant_settings, cfg.output.storage_path, callbacks,
            scheduler=scheduler, max_concurrent=cfg.sweep.max_concurrent,
        )  # fmt: skip
        table = []
        for result in results:
            trial_id = result.metrics["trial_id"]
            rows = monitor.rows.get(trial_id, [])
            rewards = [r["reward"] for r in rows]
            best = best_row(rows)
            table.append({
                "trial": trial_id,
                "label": result.config["settings"]["label"],
                "iterations": result.metrics.get("iteration"),
                "episodes": len(rows),
                "reward_mean": sum(rewards) / len(rewards) if rewards else float("nan"),
                "best_reward": best["reward"] if best else float("nan"),
                "best_compression": best["compression"] if best else float("nan"),
                "best_accuracy": best["accuracy"] if best else float("nan"),
            })  # fmt: skip
        run_dir.write_table("sweep.csv", table)
        return table
    finally:
        release(job)
        if owns_ray:
            ray.shutdown()
