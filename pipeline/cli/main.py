"""The ``n2n`` command line: ``run``, ``teacher``, ``baseline``, ``sweep`` and ``submit``
(``run`` as a Ray job, see :mod:`pipeline.cluster.submit`).

Every command's flags come from the one flag table (``pipeline.config.flags``) and every exit
code from the one exit table (``pipeline.config.exits``). Everything that can be checked
without Ray is checked first: the config (preset, ``--set`` overrides and flags), the run
directory, the teacher checkpoint, the dataset, the evaluator's import path and the MLflow
store. A problem there exits with code 2 and one line on stderr before any Ray work starts
(argparse's own errors exit 2 too). A failure during the search exits 1 with one line;
Ctrl+C exits 130 and SIGTERM 143, both saying how to resume.

The commands import the job, Ray, PyTorch and MLflow inside their functions: ``n2n --help``
and a refused command line answer in about a second instead of the ten these imports take.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.config import environment
from pipeline.config.errors import NoFeasibleStudent
from pipeline.config.exits import Exit, epilog
from pipeline.config.flags import UsageError, add_flags, config_from_args, overrides
from pipeline.config.presets import DEFAULT_PRESET, load_config, validate_config
from pipeline.config.schema import ConfigError

logger = logging.getLogger(__name__)

BASELINE_METHODS = ("l1-unstructured", "slimming", "structured-l1", "kd-student", "random")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="n2n",
        description="Compress a trained CNN into a small student by reinforcement learning (N2N).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "run": "search for a student: removal, shrinkage, fine-tuning",
        "teacher": "train a teacher on the config's dataset",
        "baseline": "a classic compressor at the same budgets, for comparison",
        "sweep": "several search trials (grid over config keys), ASHA",
        "submit": "n2n run as a Ray job: on a Ray cluster (--address) or a KubeRay RayJob (--k8s)",
    }
    parsers = {}
    for name, text in helps.items():
        # submit's own --address (the job server) replaces run's.
        extra = {"conflict_handler": "resolve"} if name == "submit" else {}
        parsers[name] = commands.add_parser(name, help=text, epilog=epilog(name), **extra)
    parsers["baseline"].add_argument(
        "method", choices=BASELINE_METHODS,
        help="l1-unstructured: magnitude pruning sweep; slimming: Network Slimming; structured-l1: "
        "Torch-Pruning group L1 channel pruning; kd-student: a small zoo net trained by KD; "
        "random: random search with the RL search's child budget",
    )  # fmt: skip
    for name, sub in parsers.items():
        add_flags(sub, name)
    parsers["teacher"].add_argument(
        "--out", help="checkpoint folder; default runs/teacher-<dataset>-<arch>"
    )
    parsers["sweep"].add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2",
        help="sweep a config key over values, e.g. --grid seed=0,1,2 --grid search.algo=ppo,random",
    )  # fmt: skip
    from pipeline.cluster.submit import add_target_flags

    add_target_flags(parsers["submit"])
    return parser


# --------------------------------------------------------------------------- commands


def _console(quiet: bool) -> Any:
    """Where progress lines go: None (logged instead) with ``--quiet``."""
    from rich.console import Console

    return None if quiet else Console(highlight=False)


def _open(args: argparse.Namespace, cfg: Any, resume: bool = False) -> Any:
    """The checks of a command that runs on Ray, in order; returns the loaded dataset."""
    from pipeline.cluster import preflight
    from pipeline.data.datasets import load_splits

    args.run_dir_resolved = cfg.output.run_dir
    preflight.check_run(cfg, resume)
    environment.quiet_ray_loggers(args.verbose)
    splits = load_splits(cfg)
    preflight.check_teacher(cfg, splits)
    return splits


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.job.run import run
    from pipeline.tracking.tables import console, summary_table
    from pipeline.tracking.tracker import tracker_for

    resume = bool(args.resume)
    cfg = config_from_args(args)
    splits = _open(args, cfg, resume)
    tracker = tracker_for(cfg)
    with tracker or contextlib.nullcontext():  # closes the MLflow run FINISHED/FAILED/KILLED
        summary = run(
            cfg, resume=resume, console=_console(args.quiet), tracker=tracker, splits=splits
        )
    out = console()
    out.print(summary_table(summary))
    out.print(f"run directory: {cfg.output.run_dir}", soft_wrap=True)
    if tracker is not None:
        out.print(f"MLflow: {tracker.where_to_look()}", soft_wrap=True)
    return Exit.OK


def cmd_teacher(args: argparse.Namespace) -> int:
    from pipeline.data.datasets import load_splits
    from pipeline.data.teachers import prepare_teacher
    from pipeline.tracking.tables import console

    cfg = config_from_args(args)
    out = Path(args.out or f"runs/teacher-{cfg.data.name}-{cfg.teacher.arch}").resolve()
    if (out / "weights.pt").exists():
        raise UsageError(f"{out} already holds a teacher; choose another --out")
    splits = load_splits(cfg)
    cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"checkpoint": None})})
    teacher = prepare_teacher(cfg, splits, out, progress=not args.quiet)
    f = teacher.facts
    console().print(
        f"teacher {f['arch']} on {cfg.data.name}: {f['params']:,} params, {f['flops']:,} FLOPs, "
        f"val {f['val_accuracy']:.4f}, test {f['test_accuracy']:.4f} -> {out}",
        soft_wrap=True,
    )
    return Exit.OK


def cmd_baseline(args: argparse.Namespace) -> int:
    from pipeline.baselines.run import run_baseline
    from pipeline.tracking.tables import console, records_table, summary_table
    from pipeline.tracking.tracker import tracker_for

    cfg = load_config(args.preset or DEFAULT_PRESET, [*args.overrides, *overrides(args)])
    if cfg.output.run_dir is None:
        cfg = cfg.model_copy(update={"name": f"{cfg.name}-{args.method}"})
    cfg = cfg.resolve_paths()
    splits = _open(args, cfg)
    tracker = tracker_for(cfg, register=cfg.baseline.register_best)
    with tracker or contextlib.nullcontext():  # closes the MLflow run FINISHED/FAILED/KILLED
        summary = run_baseline(
            cfg, args.method, console=_console(args.quiet), tracker=tracker, splits=splits
        )
    out = console()
    out.print(summary_table(summary) if args.method == "random" else records_table(summary))
    out.print(f"run directory: {cfg.output.run_dir}", soft_wrap=True)
    return Exit.OK


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipeline.job import sweeps
    from pipeline.tracking.tables import console, sweep_table
    from pipeline.tracking.tracker import tracker_for

    cfg = config_from_args(args)
    grid = dict(cfg.sweep.grid)
    for text in args.grid:
        key, sep, values = text.partition("=")
        if not sep or not values:
            raise UsageError(f"--grid {text!r} must look like key=v1,v2, e.g. --grid seed=0,1,2")
        grid[key.strip()] = [v.strip() for v in values.split(",")]
    cfg = validate_config({**cfg.model_dump(), "sweep": {**cfg.sweep.model_dump(), "grid": grid}})
    variants = sweeps.sweep_variants(cfg)  # validates every combination before Ray starts
    splits = _open(args, cfg)
    tracker = tracker_for(cfg)
    with tracker or contextlib.nullcontext():  # closes the MLflow run FINISHED/FAILED/KILLED
        table = sweeps.sweep(
            cfg, variants, console=_console(args.quiet), tracker=tracker, splits=splits
        )
    console().print(sweep_table(table))
    return Exit.OK


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
    environment.apply()
    sigterm = StopOnSigterm()
    sigterm.install()
    try:
        return int(COMMANDS[args.command](args))
    except (ConfigError, UsageError) as err:
        print(f"n2n {args.command}: error: {err}", file=sys.stderr)
        return Exit.USAGE
    except NoFeasibleStudent as err:
        where = getattr(args, "run_dir_resolved", None)
        print(f"n2n {args.command}: {err} (everything measured is in {where})", file=sys.stderr)
        return Exit.INFEASIBLE
    except KeyboardInterrupt:
        where = ""
        run_dir = getattr(args, "resume", None) or _last_run_dir(args)
        if run_dir and args.command == "run" and (Path(run_dir) / "config.yaml").is_file():
            where = f"; continue with: n2n run --resume {run_dir}"
        what = "terminated (SIGTERM)" if sigterm.received else "interrupted"
        print(f"n2n {args.command}: {what}{where}", file=sys.stderr)
        return Exit.TERMINATED if sigterm.received else Exit.INTERRUPTED
    except ValueError as err:  # bad input found by a library check (dataset, teacher, MLflow ...)
        print(f"n2n {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return Exit.USAGE
    except Exception as err:
        logger.debug("n2n failed", exc_info=True)
        print(
            f"n2n {args.command}: failed: {type(err).__name__}: {_one_line(err)}", file=sys.stderr
        )
        return Exit.FAILED


def _one_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def _last_run_dir(args: argparse.Namespace) -> str | None:
    return getattr(args, "run_dir_resolved", None)


if __name__ == "__main__":
    sys.exit(main())
