"""The one table of run flags: what each flag of ``n2n run`` (and of ``teacher``, ``baseline``,
``sweep`` and ``submit``) sets in the config, which commands take it, and whether it may change
on ``--resume``.

Every command's parser is built from :data:`FLAGS` (:func:`add_flags`), the dotted overrides a
command line stands for come from it (:func:`overrides`), and so do the flags ``n2n submit``
passes on to the job's own ``n2n run`` (:func:`forwarded`): a flag added here reaches all of
them, and ``tests/test_cli.py`` fails on a run flag that is not here.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config.presets import DEFAULT_PRESET, load_config, presets, validate_config
from pipeline.config.schema import RunConfig

COMMANDS = ("run", "teacher", "baseline", "sweep", "submit")
SEARCHES = ("run", "sweep", "submit")
RUNS = ("run", "submit")
TRACKED = ("run", "baseline", "sweep", "submit")


class UsageError(ValueError):
    """Bad input found before any Ray work; exit code 2."""


@dataclass(frozen=True)
class Flag:
    """One command-line flag and the config keys it sets."""

    name: str
    """The long option, e.g. ``--seed``."""
    help: str
    keys: tuple[str, ...] = ()
    """Dotted config keys the flag sets (all to the same value); none for flags that say how
    to run rather than what (``--preset``, ``--set``, ``--resume``, ``--quiet``)."""
    type: Any = str
    """The value's type; None for a switch, which sets its keys to :attr:`value`."""
    value: str = "true"
    choices: tuple[str, ...] | None = None
    commands: tuple[str, ...] = COMMANDS
    resumable: bool = False
    """May be given with ``--resume``: it says where the run goes, never what it searches."""
    forward: bool = False
    """``n2n submit`` passes it on as given to the job's ``n2n run`` (the others it passes
    resolved, as paths that outlive the job, or not at all)."""
    short: str | None = None
    metavar: str | None = None
    repeat: bool = False
    """May be given several times; the keys get the list of values."""

    @property
    def dest(self) -> str:
        return {"--set": "overrides"}.get(self.name, self.name.lstrip("-").replace("-", "_"))


FLAGS: tuple[Flag, ...] = (
    Flag("--preset", "preset name ({presets}) or a YAML file; default " + DEFAULT_PRESET,
         short="-p"),
    Flag("--set", "override a config key, e.g. --set removal.iterations=3 (repeatable; values "
         "are YAML)", repeat=True, metavar="KEY=VALUE"),
    Flag("--seed", "seed of everything (config key seed)", keys=("seed",), type=int,
         forward=True),
    Flag("--run-dir", "run directory (output.run_dir); default runs/<name>-<time>",
         keys=("output.run_dir",)),
    Flag("--address", "join this Ray cluster (ray.address), e.g. auto or ray://host:10001",
         keys=("ray.address",), resumable=True),
    Flag("--quiet", "no progress lines, only the final table", type=None, resumable=True),
    Flag("--algo", "search algorithm (search.algo)", keys=("search.algo",),
         choices=("ppo", "appo", "random"), commands=SEARCHES, forward=True),
    Flag("--policy", "policy network (search.policy)", keys=("search.policy",),
         choices=("lstm", "mlp"), commands=SEARCHES, forward=True),
    Flag("--iterations", "iterations of each stage (removal/shrinkage.iterations)",
         keys=("removal.iterations", "shrinkage.iterations"), type=int, commands=SEARCHES,
         forward=True),
    Flag("--episodes", "children per iteration of each stage (…episodes_per_iteration)",
         keys=("removal.episodes_per_iteration", "shrinkage.episodes_per_iteration"), type=int,
         commands=SEARCHES, forward=True),
    Flag("--env-runners", "children evaluated at once (search.env_runners)",
         keys=("search.env_runners",), type=int, commands=SEARCHES, forward=True),
    Flag("--storage-path", "Ray Tune storage, local path or s3:// (output.storage_path)",
         keys=("output.storage_path",), commands=SEARCHES),
    Flag("--tracking-uri", "MLflow tracking URI (tracking.uri); default sqlite:///mlflow.db",
         keys=("tracking.uri",), commands=TRACKED, resumable=True),
    Flag("--no-tracking", "do not log to MLflow", keys=("tracking.enabled",), type=None,
         value="false", commands=TRACKED, resumable=True),
    Flag("--skip-removal", "skip stage 1 (removal.enabled=false)", keys=("removal.enabled",),
         type=None, value="false", commands=RUNS, forward=True),
    Flag("--skip-shrinkage", "skip stage 2 (shrinkage.enabled=false)",
         keys=("shrinkage.enabled",), type=None, value="false", commands=RUNS, forward=True),
    Flag("--policy-from", "start each stage's policy from this earlier run's (policy transfer; "
         "search.policy_from)", keys=("search.policy_from",), metavar="RUN_DIR", commands=RUNS),
    Flag("--freeze-policy", "with --policy-from: evaluate the transferred policy, do not train "
         "it (search.freeze_policy)", keys=("search.freeze_policy",), type=None, commands=RUNS,
         forward=True),
    Flag("--resume", "continue an interrupted run from its directory", metavar="RUN_DIR",
         commands=RUNS, resumable=True),
    Flag("--params", "the most parameters the student may have (budget.params): the search "
         "aims at it and the student is chosen within it", keys=("budget.params",), type=int,
         metavar="N", commands=RUNS, forward=True),
    Flag("--compression", "at least this many times fewer parameters than the teacher "
         "(budget.compression), e.g. 10", keys=("budget.compression",), type=float,
         metavar="X", commands=RUNS, forward=True),
    Flag("--flops", "the most FLOPs per image, a count or at most 1 for a fraction of the "
         "teacher's (budget.flops)", keys=("budget.flops",), type=float, metavar="F",
         commands=RUNS, forward=True),
    Flag("--params", "parameter budget (repeatable; baseline.params); default teacher/10 and "
         "teacher/20", keys=("baseline.params",), type=int, repeat=True, metavar="N",
         commands=("baseline",)),
    Flag("--register", "register the best student (baseline.register_best)",
         keys=("baseline.register_best",), type=None, commands=("baseline",)),
)  # fmt: skip


def add_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """Adds every flag of ``command`` from the table."""
    for flag in FLAGS:
        if command not in flag.commands:
            continue
        names = [flag.short, flag.name] if flag.short else [flag.name]
        text = flag.help.format(presets=", ".join(sorted(presets())))
        if flag.type is None:
            parser.add_argument(*names, dest=flag.dest, action="store_true", help=text)
        elif flag.repeat:
            default = [] if flag.name == "--set" else None
            parser.add_argument(*names, dest=flag.dest, action="append", type=flag.type,
                                default=default, metavar=flag.metavar, help=text)  # fmt: skip
        else:
            parser.add_argument(*names, dest=flag.dest, type=flag.type, choices=flag.choices,
                                metavar=flag.metavar, help=text)  # fmt: skip


def given(args: argparse.Namespace) -> list[Flag]:
    """The table's flags set on this command line (of its command, when it names one)."""
    command = getattr(args, "command", None)
    return [
        f for f in FLAGS
        if (command is None or command in f.commands) and _set(getattr(args, f.dest, None))
    ]  # fmt: skip


def _set(value: Any) -> bool:
    """Whether a parsed flag was given: a switch that is on, a list that is not empty, or any
    value (``--iterations 0`` included, so that the config refuses it by name)."""
    if isinstance(value, bool):
        return value
    return value is not None and value != []


def overrides(args: argparse.Namespace) -> list[str]:
    """The dotted ``key=value`` overrides that the flags of a command line stand for."""
    out: list[str] = []
    for flag in given(args):
        value = getattr(args, flag.dest)
        if flag.type is None:
            value = flag.value
        elif flag.repeat:
            value = list(value)
        out += [f"{key}={value}" for key in flag.keys]
    return out


def forwarded(args: argparse.Namespace) -> list[str]:
    """The flags ``n2n submit`` passes on, as given, to the job's own ``n2n run``."""
    out: list[str] = []
    for flag in given(args):
        if flag.forward:
            out += [flag.name] if flag.type is None else [flag.name, str(getattr(args, flag.dest))]
    return out


def not_resumable(args: argparse.Namespace) -> str | None:
    """The first flag given that ``--resume`` does not allow (it would change the search)."""
    return next((f.name for f in given(args) if not f.resumable), None)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The validated, path-resolved config of a command line (or the resumed run's own)."""
    if getattr(args, "resume", None):
        return _resume_config(args)
    cfg = load_config(args.preset or DEFAULT_PRESET, [*args.overrides, *overrides(args)])
    return cfg.resolve_paths()


def _resume_config(args: argparse.Namespace) -> RunConfig:
    run_dir = Path(args.resume).expanduser().resolve()
    if not (run_dir / "config.yaml").is_file():
        raise UsageError(
            f"--resume {args.resume}: no config.yaml there; pass the directory of an earlier n2n run"
        )
    if flag := not_resumable(args):
        allowed = " and ".join(f.name for f in FLAGS if f.resumable and f.keys)
        raise UsageError(
            f"--resume continues the run as configured in {run_dir / 'config.yaml'}; drop "
            f"{flag} (only {allowed} may change)"
        )
    cfg = load_config(run_dir / "config.yaml", overrides(args))
    old_dir = Path(cfg.output.run_dir or "")
    if old_dir != run_dir:  # the run directory was moved: follow it
        output = {**cfg.output.model_dump(), "run_dir": str(run_dir)}
        if cfg.output.storage_path == str(old_dir / "tune"):
            output["storage_path"] = None  # the default, inside the run directory
        cfg = validate_config({**cfg.model_dump(), "output": output})
    return cfg.resolve_paths()
