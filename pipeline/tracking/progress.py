"""What a person sees while a search runs, and what each iteration leaves in the run directory.

:class:`StageMonitor` is a Ray Tune callback living in the driver. After each iteration a
stage trial reports, it drains the children the env runners recorded, numbers them, appends
them to ``children.csv`` and the iteration to ``iterations.csv``, sends both to MLflow and
prints one line: episodes sampled vs expected, reward mean/max/min (the metrics the SageMaker
N2N example scraped from its logs), best compression and accuracy so far, children evaluated,
cache hits, elapsed and estimated remaining time.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping
from typing import Any

import ray
from ray import tune
from rich.console import Console
from rich.markup import escape

from pipeline.tracking.rundir import RunDir, ok

logger = logging.getLogger(__name__)


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Clock:
    """Elapsed time and an ETA from the iterations done in this process so far."""

    def __init__(self, total_iterations: int, done_before: int = 0) -> None:
        self.start = time.monotonic()
        self.search_start: float | None = None
        self.total = total_iterations
        self.done_before = done_before
        self.done_now = 0

    def begin_search(self) -> None:
        """Marks the start of the search: the ETA extrapolates from search time only."""
        if self.search_start is None:
            self.search_start = time.monotonic()

    def tick(self) -> None:
        self.done_now += 1

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def eta(self) -> float:
        remaining = max(0, self.total - self.done_before - self.done_now)
        if not self.done_now:
            return math.inf
        searching = time.monotonic() - (self.search_start or self.start)
        return searching / self.done_now * remaining


def iteration_stats(rows: list[dict[str, Any]], stage_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Reward statistics of one iteration's children and the stage's best so far."""
    rewards = [r["reward"] for r in rows if isinstance(r.get("reward"), int | float)]
    good = [r for r in stage_rows if ok(r)]
    best = max(good, key=lambda r: r["reward"], default=None)
    return {
        "children": len(rows),
        "reward_mean": sum(rewards) / len(rewards) if rewards else math.nan,
        "reward_max": max(rewards, default=math.nan),
        "reward_min": min(rewards, default=math.nan),
        "best_reward": best["reward"] if best else math.nan,
        "best_compression": best["compression"] if best else math.nan,
        "best_accuracy": best["accuracy"] if best else math.nan,
        "children_total": len(stage_rows),
        "cache_hits": sum(1 for r in stage_rows if r.get("cache_hit")),
        "failed": sum(1 for r in stage_rows if r.get("error")),
    }


_MONITORS: dict[str, StageMonitor] = {}
"""Live monitors by key. Tune pickles its callbacks into the experiment (``tuner.pkl``) and
restores them from there on resume, so the callback itself holds only a key and finds the
driver's current monitor (with its console, tracker and actor handle) here."""


class MonitorCallback(tune.Callback):
    """The picklable Tune callback that forwards trial events to a registered StageMonitor."""

    def __init__(self, key: str) -> None:
        self.key = key

    def _monitor(self) -> StageMonitor | None:
        monitor = _MONITORS.get(self.key)
        if monitor is None:
            logger.warning("no progress monitor registered for %s", self.key)
        return monitor

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if (monitor := self._monitor()) is not None:
            monitor.on_result(trial, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if (monitor := self._monitor()) is not None:
            monitor.on_complete(trial)


class StageMonitor:
    """Drains recorded children after each reported iteration; writes, tracks and prints them.

    Args:
        stage: ``"removal"`` or ``"shrinkage"``.
        log: the run's ``ChildLog`` actor.
        run_dir: where ``children.csv`` and ``iterations.csv`` go.
        clock: elapsed time and ETA over the whole search.
        console: rich console for the progress lines (None: log them instead).
        tracker: a ``pipeline.tracking.tracker.Tracker`` or None.
        per_trial_names: name tracker stages ``stage/trial`` (sweeps with several trials).
    """

    def __init__(
        self,
        stage: str,
        log: Any,
        run_dir: RunDir,
        clock: Clock,
        console: Console | None = None,
        tracker: Any = None,
        per_trial_names: bool = False,
    ) -> None:
        self.stage, self.log, self.run_dir, self.clock = stage, log, run_dir, clock
        self.console, self.tracker, self.per_trial_names = console, tracker, per_trial_names
        self.rows: dict[str, list[dict[str, Any]]] = {}
        # A resumed stage (see RunDir.drop_uncommitted): iterations up to these are recorded.
        self.committed = run_dir.committed(stage)
        for row in run_dir.children(stage):  # earlier rows of a resumed stage
            self.rows.setdefault(row.get("trial") or "", []).append(slim(row))
        self.episodes = sum(len(v) for v in self.rows.values())
        self.replayed = 0
        """Iterations reported again after a resume that were already committed (not recorded)."""
        self.warnings: list[str] = []
        clock.begin_search()

    def callback(self) -> MonitorCallback:
        """Registers this monitor and returns the Tune callback that feeds it."""
        key = f"{self.run_dir.path}:{self.stage}"
        _MONITORS[key] = self
        return MonitorCallback(key)

    @property
    def all_rows(self) -> list[dict[str, Any]]:
        return [r for rows in self.rows.values() for r in rows]

    def _take(self, trial_id: str, iteration: int) -> list[dict[str, Any]]:
        rows = ray.get(self.log.drain.remote(trial_id))
        for row in rows:
            self.episodes += 1
            row.update(stage=self.stage, episode=self.episodes, iteration=iteration, trial=trial_id)
        self.run_dir.append_children(rows)
        rows = [slim(row) for row in rows]
        self.rows.setdefault(trial_id, []).extend(rows)
        return rows

    def on_result(self, trial: Any, result: dict) -> None:
        """One iteration of ``trial`` was reported.

        The files are written first and MLflow second: ``iterations.csv`` is the commit point
        of an iteration, and MLflow only ever sees committed iterations.
        """
        step = int(result.get("iteration", result.get("training_iteration", 0)))
        if step <= self.committed.get(trial.trial_id, 0):
            # Tune restored the trial from a checkpoint older than the last iteration the
            # driver recorded before it died: this iteration is already in the records.
            ray.get(self.log.drain.remote(trial.trial_id))
            self.replayed += 1
            logger.info("%s iteration %d replayed after the resume; kept its first record",
                        self.stage, step)  # fmt: skip
            return
        rows = self._take(trial.trial_id, step)
        self.clock.tick()
        stats = iteration_stats(rows, self.rows[trial.trial_id])
        expected = int(result.get("episodes_expected", 0))
        row = {
            "stage": self.stage,
            "trial": trial.trial_id,
            "iteration": step,
            "episodes": len(rows),
            "episodes_expected": expected,
            "rl_episodes": result.get("episodes"),
            "elapsed_s": round(self.clock.elapsed, 2),
            **stats,
            **{k: v for k, v in result.items() if k.startswith("learner_")},
        }
        self.run_dir.append_iteration(row)
        self.committed[trial.trial_id] = step
        if self.tracker is not None and rows:
            self.tracker.log_children(rows)
        if len(rows) < expected:
            message = (
                f"{self.stage} iteration {step}: {len(rows)} children evaluated but {expected} "
                "expected; raise search.sample_timeout_s if env runners time out"
            )
            self.warnings.append(message)
            logger.warning(message)
        if self.tracker is not None:
            name = f"{self.stage}/{trial.trial_id}" if self.per_trial_names else self.stage
            self.tracker.log_iteration(name, step, tracked_metrics(row))
        self._print(
            row, result, (trial.config.get("settings") or {}).get("label") or trial.trial_id
        )

    def on_complete(self, trial: Any) -> None:
        """``trial`` ended. APPO samples asynchronously: children in flight at its last report land here."""
        last = max((r.get("iteration") or 0 for r in self.rows.get(trial.trial_id, [])), default=0)
        rows = self._take(trial.trial_id, last)
        if self.tracker is not None and rows:
            self.tracker.log_children(rows)

    def _print(self, row: dict[str, Any], result: dict[str, Any], label: str) -> None:
        total = result.get("iterations_total") or "?"
        who = f"{self.stage}" + (f" {escape(label)}" if self.per_trial_names else "")
        line = (
            f"[bold]{who}[/] {row['iteration']}/{total} "
            f"ep {row['episodes']}/{row['episodes_expected']} | "
            f"R mean {row['reward_mean']:.3f} max {row['reward_max']:.3f} min {row['reward_min']:.3f} | "
            f"best C={row['best_compression']:.3f} acc={row['best_accuracy']:.3f} | "
            f"children {row['children_total']} hits {row['cache_hits']} failed {row['failed']} | "
            f"{_fmt_time(self.clock.elapsed)} ETA {_fmt_time(self.clock.eta)}"
        )
        if self.console is not None:
            self.console.print(line, highlight=False, soft_wrap=True)
        else:
            logger.info(line.replace("[bold]", "").replace("[/]", ""))


def slim(row: dict[str, Any]) -> dict[str, Any]:
    """A child record as the driver keeps it in memory: without its spec, which
    ``children.csv`` holds (a spec lists every channel group, most of a record's bytes), and
    with its keys and unit names interned (one string each for the whole run, not per row)."""
    out = {sys.intern(k): v for k, v in row.items() if k != "spec"}
    if isinstance(out.get("ratios"), dict):
        out["ratios"] = {sys.intern(u): r for u, r in out["ratios"].items()}
    return out


def tracked_metrics(row: Mapping[str, Any]) -> dict[str, Any]:
    """An iteration row as MLflow metric keys."""
    keys = {
        "reward_mean": "reward/mean", "reward_max": "reward/max", "reward_min": "reward/min",
        "best_reward": "best/reward", "best_compression": "best/compression",
        "best_accuracy": "best/accuracy", "children_total": "children/evaluated",
        "cache_hits": "cache/hits", "failed": "children/failed", "episodes": "episodes/sampled",
        "episodes_expected": "episodes/expected",
    }  # fmt: skip
    keys |= {key: key.replace("learner_", "learner/") for key in row if key.startswith("learner_")}
    return {name: row[key] for key, name in keys.items() if row.get(key) is not None}
