"""The ``n2n`` command line: ``run``, ``teacher``, ``baseline``, ``sweep`` and ``submit``
(``run`` as a Ray job, see :mod:`pipeline.cluster.submit`).

Everything that can be checked without Ray is checked first: the config (preset, ``--set``
overrides and flags), the run directory, the teacher checkpoint, the dataset, the evaluator's
import path and the MLflow store. A problem there exits with code 2 and one line on stderr
before any Ray work starts (argparse's own errors exit 2 too). A failure during the search
exits 1 with one line; Ctrl+C exits 130 and SIGTERM 143, both saying how to resume.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.cluster import preflight
from pipeline.cluster.job_paths import cluster_paths_problem
from pipeline.config.schema import (
    DEFAULT_PRESET,
    ConfigError,
    RunConfig,
    load_config,
    presets,
    validate_config,
)

logger = logging.getLogger(__name__)

EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 1, 130, 143
RESUME_FLAGS = ("address", "tracking_uri", "no_tracking")
"""Flags that may change on --resume: where the run goes, never what it searches."""


class UsageError(ValueError):
    """Bad input found before any Ray work; exit code 2."""


class StopOnSigterm:
    """SIGTERM (a Kubernetes eviction, ``timeout``, ``docker stop``) stops a run like Ctrl+C.

    The signal is handed to the current SIGINT handler: during a search that is Ray Tune's,
    which stops the trials and saves the experiment; elsewhere Python's, which raises
    ``KeyboardInterrupt``. Either way the run directory is consistent, open MLflow runs end
    KILLED and the command exits 143 saying how to resume.
    """

    def __init__(self) -> None:
        self.received = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt


# --------------------------------------------------------------------------- parser


def _config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-p", "--preset", default=None,
        help=f"preset name ({', '.join(sorted(presets()))}) or a YAML file; default {DEFAULT_PRESET}",
    )  # fmt: skip
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set removal.iterations=3 (repeatable; values are YAML)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, help="seed of everything (config key seed)")
    p.add_argument("--run-dir", help="run directory (output.run_dir); default runs/<name>-<time>")
    p.add_argument(
        "--address", help="join this Ray cluster (ray.address), e.g. auto or ray://host:10001"
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines, only the final table")


def _search_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--algo", choices=["ppo", "appo", "random"], help="search algorithm (search.algo)"
    )
    p.add_argument("--policy", choices=["lstm", "mlp"], help="policy network (search.policy)")
    p.add_argument(
        "--iterations", type=int, help="iterations of each stage (removal/shrinkage.iterations)"
    )
    p.add_argument(
        "--episodes",
        type=int,
        help="children per iteration of each stage (…episodes_per_iteration)",
    )
    p.add_argument(
        "--env-runners", type=int, help="children evaluated at once (search.env_runners)"
    )
    p.add_argument(
        "--storage-path", help="Ray Tune storage, local path or s3:// (output.storage_path)"
    )
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (tracking.uri); default sqlite:///mlflow.db"
    )
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")


def _run_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``n2n run`` (and of ``n2n submit``, which runs it as a job)."""
    _config_flags(p)
    _search_flags(p)
    p.add_argument(
        "--skip-removal", action="store_true", help="skip stage 1 (removal.enabled=false)"
    )
    p.add_argument(
        "--skip-shrinkage", action="store_true", help="skip stage 2 (shrinkage.enabled=false)"
    )
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue an interrupted run from its directory"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="n2n",
        description="Compress a trained CNN into a small student by reinforcement learning (N2N).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="search for a student: removal, shrinkage, fine-tuning")
    _run_flags(run)

    teacher = commands.add_parser("teacher", help="train a teacher on the config's dataset")
    _config_flags(teacher)
    teacher.add_argument("--out", help="checkpoint folder; default runs/teacher-<dataset>-<arch>")

    baseline = commands.add_parser(
        "baseline", help="a classic compressor at the same budgets, for comparison"
    )
    baseline.add_argument(
        "method", choices=["l1-unstructured", "slimming", "structured-l1", "kd-student", "random"],
        help="l1-unstructured: magnitude pruning sweep; slimming: Network Slimming; structured-l1: "
        "Torch-Pruning group L1 channel pruning; kd-student: a small zoo net trained by KD; "
        "random: random search with the RL search's child budget",
    )  # fmt: skip
    _config_flags(baseline)
    baseline.add_argument(
        "--params", type=int, action="append", metavar="N",
        help="parameter budget (repeatable; baseline.params); default teacher/10 and teacher/20",
    )  # fmt: skip
    baseline.add_argument(
        "--tracking-uri", help="MLflow tracking URI (tracking.uri); default sqlite:///mlflow.db"
    )
    baseline.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    baseline.add_argument(
        "--register", action="store_true", help="register the best student (baseline.register_best)"
    )

    sweep = commands.add_parser("sweep", help="several search trials (grid over config keys), ASHA")
    _config_flags(sweep)
    _search_flags(sweep)
    sweep.add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2",
        help="sweep a config key over values, e.g. --grid seed=0,1,2 --grid search.algo=ppo,random",
    )  # fmt: skip

    from pipeline.cluster.submit import add_target_flags

    # `n2n run`'s flags, then the target's (its --address, the job server, replaces run's).
    submit = commands.add_parser(
        "submit", conflict_handler="resolve",
        help="n2n run as a Ray job: on a Ray cluster (--address) or a KubeRay RayJob (--k8s)",
    )  # fmt: skip
    _run_flags(submit)
    add_target_flags(submit)
    return parser


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The dotted overrides that the convenience flags stand for."""
    out: list[str] = []
    pairs = {
        "seed": ["seed"], "run_dir": ["output.run_dir"], "address": ["ray.address"],
        "algo": ["search.algo"], "policy": ["search.policy"], "env_runners": ["search.env_runners"],
        "storage_path": ["output.storage_path"], "tracking_uri": ["tracking.uri"],
        "iterations": ["removal.iterations", "shrinkage.iterations"],
        "episodes": ["removal.episodes_per_iteration", "shrinkage.episodes_per_iteration"],
    }  # fmt: skip
    for attr, keys in pairs.items():
        value = getattr(args, attr, None)
        if value is not None:
            out += [f"{key}={value}" for key in keys]
    if getattr(args, "no_tracking", False):
        out.append("tracking.enabled=false")
    if getattr(args, "skip_removal", False):
        out.append("removal.enabled=false")
    if getattr(args, "skip_shrinkage", False):
        out.append("shrinkage.enabled=false")
    if getattr(args, "params", None):
        out.append(f"baseline.params={list(args.params)}")
    if getattr(args, "register", False):
        out.append("baseline.register_best=true")
    return out


# --------------------------------------------------------------------------- checks (no Ray)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The validated, path-resolved config of a command line (or the resumed run's own)."""
    if getattr(args, "resume", None):
        return _resume_config(args)
    cfg = load_config(args.preset or DEFAULT_PRESET, [*args.overrides, *flag_overrides(args)])
    return cfg.resolve_paths()


def _resume_config(args: argparse.Namespace) -> RunConfig:
    run_dir = Path(args.resume).expanduser().resolve()
    if not (run_dir / "config.yaml").is_file():
        raise UsageError(
            f"--resume {args.resume}: no config.yaml there; pass the directory of an earlier n2n run"
        )
    changed = [flag for flag in ("preset", "overrides", "seed", "run_dir", "algo", "policy", "iterations",
                                 "episodes", "env_runners", "storage_path", "skip_removal", "skip_shrinkage")
               if getattr(args, flag, None)]  # fmt: skip
    if changed:
        raise UsageError(
            f"--resume continues the run as configured in {run_dir / 'config.yaml'}; drop "
            f"{_flag_name(changed[0])} (only --address and --tracking-uri may change)"
        )
    cfg = load_config(run_dir / "config.yaml", flag_overrides(args))
    old_dir = Path(cfg.output.run_dir or "")
    if old_dir != run_dir:  # the run directory was moved: follow it
        output = {**cfg.output.model_dump(), "run_dir": str(run_dir)}
        if cfg.output.storage_path == str(old_dir / "tune"):
            output["storage_path"] = None  # the default, inside the run directory
        cfg = validate_config({**cfg.model_dump(), "output": output})
    return cfg.resolve_paths()


def _flag_name(attr: str) -> str:
    return {"overrides": "--set", "preset": "--preset"}.get(attr, "--" + attr.replace("_", "-"))


def check_run(cfg: RunConfig, resume: bool) -> None:
    """Everything about a run that can fail before the data is loaded and Ray starts."""
    run_dir = Path(cfg.output.run_dir or "")
    if not resume and run_dir.is_dir() and any(run_dir.iterdir()):
        raise UsageError(
            f"run directory {run_dir} already holds a run; continue it with --resume {run_dir} "
            "or choose another --run-dir"
        )
    preflight.check_writable(run_dir, "run directory", "--run-dir")
    storage = cfg.output.storage_path or ""
    if storage and "://" not in storage:
        preflight.check_writable(storage, "Tune storage", "--storage-path")
    if cfg.teacher.checkpoint is not None:
        folder = Path(cfg.teacher.checkpoint)
        if not ((folder / "spec.json").is_file() and (folder / "weights.pt").is_file()):
            raise UsageError(
                f"teacher.checkpoint {folder} is not a checkpoint folder (spec.json + weights.pt); "
                "train one with n2n teacher"
            )
    module, _, attr = cfg.search.evaluator.partition(":")
    try:
        getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        raise UsageError(
            f"search.evaluator {cfg.search.evaluator!r} cannot be imported; use 'package.module:Class'"
        ) from None
    preflight.check_address(cfg.ray.address)
    if problem := cluster_paths_problem(cfg):  # inside a Ray job: results must outlive it
        raise UsageError(problem)


def make_tracker(cfg: RunConfig, register: bool = True) -> Any:
    """An MLflow tracker that has been checked to work, or None when tracking is off.

    ``register=False`` gives a tracker that logs a student without registering it.
    """
    if not cfg.tracking.enabled:
        return None
    from pipeline.tracking.tracker import Tracker

    registry_name = (cfg.tracking.registry_name or f"n2n-{cfg.name}") if register else None
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, registry_name)
    tracker.check_reachable()
    return tracker


# --------------------------------------------------------------------------- commands


def _quiet_ray(verbose: bool) -> None:
    """Keeps Ray's own warnings off the progress lines (``import ray`` resets these levels)."""
    import ray  # noqa: F401

    for noisy in ("ray.rllib", "ray.tune", "ray.train"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.ERROR)


def _console(quiet: bool) -> Any:
    from rich.console import Console

    return None if quiet else Console(highlight=False)


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pipeline.job import run as compress
    from pipeline.tracking.progress import summary_table

    resume = bool(args.resume)
    cfg = config_from_args(args)
    args.run_dir_resolved = cfg.output.run_dir
    check_run(cfg, resume)
    _quiet_ray(args.verbose)
    splits = compress.load_splits(cfg)
    preflight.check_teacher(cfg, splits)
    tracker = make_tracker(cfg)
    console = _console(args.quiet)
    with tracker or contextlib.nullcontext():  # closes the MLflow run FINISHED/FAILED/KILLED
        summary = compress.run(cfg, resume=resume, console=console, tracker=tracker, splits=splits)
    out = Console(highlight=False)
    out.print(summary_table(summary))
    out.print(f"run directory: {cfg.output.run_dir}")
    if tracker is not None and (url := tracker.ui_url()):
        out.print(f"MLflow run: {url}", soft_wrap=True)
    return 0


def cmd_teacher(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pipeline.job import run as compress
    from pipeline.tracking.rundir import RunDir

    cfg = config_from_args(args)
    out = Path(args.out or f"runs/teacher-{cfg.data.name}-{cfg.teacher.arch}").resolve()
    if (out / "weights.pt").exists():
        raise UsageError(f"{out} already holds a teacher; choose another --out")
    splits = compress.load_splits(cfg)
    cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"checkpoint": None})})
    teacher = compress.prepare_teacher(
        cfg, RunDir(out.parent), splits, _console(args.quiet), folder=out
    )
    f = teacher.facts
    Console(highlight=False).print(
        f"teacher {f['arch']} on {cfg.data.name}: {f['params']:,} params, {f['flops']:,} FLOPs, "
        f"val {f['val_accuracy']:.4f}, test {f['test_accuracy']:.4f} -> {out}"
    )
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pipeline.baselines import run as baselines
    from pipeline.job import run as compress
    from pipeline.tracking.progress import summary_table

    cfg = load_config(args.preset or DEFAULT_PRESET, [*args.overrides, *flag_overrides(args)])
    if cfg.output.run_dir is None:
        cfg = cfg.model_copy(update={"name": f"{cfg.name}-{args.method}"})
    cfg = cfg.resolve_paths()
    args.run_dir_resolved = cfg.output.run_dir
    check_run(cfg, resume=False)
    _quiet_ray(args.verbose)
    splits = compress.load_splits(cfg)
    preflight.check_teacher(cfg, splits)
    tracker = make_tracker(cfg, register=cfg.baseline.register_best)
    with tracker or contextlib.nullcontext():  # closes the MLflow run FINISHED/FAILED/KILLED
        summary = baselines.run_baseline(
            cfg, args.method, console=_console(args.quiet), tracker=tracker, splits=splits
        )
    out = Console(highlight=False)
    if args.method == "random":
        out.print(summary_table(summary))
    else:
        out.print(baselines.records_table(summary))
    out.print(f"run directory: {cfg.output.run_dir}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pipeline.job import run as compress
    from pipeline.job import sweeps

    cfg = config_from_args(args)
    grid = dict(cfg.sweep.grid)
    for text in args.grid:
        key, sep, values = text.partition("=")
        if not sep or not values:
            raise UsageError(f"--grid {text!r} must look like key=v1,v2, e.g. --grid seed=0,1,2")
        grid[key.strip()] = [v.strip() for v in values.split(",")]
    cfg = validate_config({**cfg.model_dump(), "sweep": {**cfg.sweep.model_dump(), "grid": grid}})
    variants = sweeps.sweep_variants(cfg)  # validates every combination before Ray starts
    check_run(cfg, resume=False)
    _quiet_ray(args.verbose)
    splits = compress.load_splits(cfg)
    preflight.check_teacher(cfg, splits)
    tracker = make_tracker(cfg)
    with tracker or contextlib.nullcontext():  # closes the MLflow run FINISHED/FAILED/KILLED
        table = sweeps.sweep(
            cfg, variants, console=_console(args.quiet), tracker=tracker, splits=splits
        )
    Console(highlight=False).print(sweeps.sweep_table(table))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.cluster.submit import submit

    return submit(args)


COMMANDS = {
    "run": cmd_run, "teacher": cmd_teacher, "sweep": cmd_sweep, "baseline": cmd_baseline,
    "submit": cmd_submit,
}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``n2n`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    # Like ``python -m``: a custom builder or evaluator in the current directory is importable
    # (the console script's sys.path holds only its own bin folder).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # Our progress lines replace Tune's status tables; per-iteration checkpoints are intended.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Save Tune's experiment state after every event (it is small): a killed driver then
    # resumes from the iteration it last recorded instead of one replayed from an older state.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    sigterm = StopOnSigterm()
    sigterm.install()
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, UsageError) as err:
        print(f"n2n {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        where = ""
        run_dir = getattr(args, "resume", None) or _last_run_dir(args)
        if run_dir and args.command == "run" and (Path(run_dir) / "config.yaml").is_file():
            where = f"; continue with: n2n run --resume {run_dir}"
        what = "terminated (SIGTERM)" if sigterm.received else "interrupted"
        print(f"n2n {args.command}: {what}{where}", file=sys.stderr)
        return EXIT_TERMINATED if sigterm.received else EXIT_INTERRUPTED
    except ValueError as err:  # bad input found by a library check (dataset, teacher, MLflow ...)
        print(f"n2n {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:
        logger.debug("n2n failed", exc_info=True)
        print(
            f"n2n {args.command}: failed: {type(err).__name__}: {_one_line(err)}", file=sys.stderr
        )
        return EXIT_FAILED


def _one_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def _last_run_dir(args: argparse.Namespace) -> str | None:
    return getattr(args, "run_dir_resolved", None)


if __name__ == "__main__":
    sys.exit(main())
