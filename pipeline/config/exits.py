"""Every exit code of the ``n2n`` command line, in one table, with what each means per command."""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    """Exit codes; :data:`MEANINGS` says what each one means for each command."""

    OK = 0
    FAILED = 1
    USAGE = 2
    STOPPED = 3
    DEADLINE = 4
    INFEASIBLE = 5
    INTERRUPTED = 130
    TERMINATED = 143


_LOCAL = {
    Exit.OK: "done",
    Exit.FAILED: "failed (the run directory keeps what was measured)",
    Exit.USAGE: "bad input, refused before any work started",
    Exit.INTERRUPTED: "Ctrl+C",
    Exit.TERMINATED: "SIGTERM",
}
MEANINGS: dict[str, dict[Exit, str]] = {
    "run": {
        **_LOCAL,
        Exit.INFEASIBLE: "no student within the budget (--params, --compression, --flops); "
        "the run directory keeps every child measured",
        Exit.INTERRUPTED: "Ctrl+C (continue with n2n run --resume RUN_DIR)",
        Exit.TERMINATED: "SIGTERM (continue with n2n run --resume RUN_DIR)",
    },
    "teacher": _LOCAL,
    "baseline": _LOCAL,
    "sweep": _LOCAL,
    "submit": {
        Exit.OK: "the job SUCCEEDED (or --no-wait, --dry-run or --delete did their part)",
        Exit.FAILED: "the job FAILED",
        Exit.USAGE: "nothing was started: bad input, no token, or the cluster is not reachable",
        Exit.STOPPED: "the job was STOPPED (or its RayJob deleted) by someone else",
        Exit.DEADLINE: "the deadline passed and the job was stopped",
        Exit.INTERRUPTED: "Ctrl+C: stopped following; the job keeps running",
    },
}


def epilog(command: str) -> str:
    """The exit codes of ``command`` as one line of ``--help``."""
    return "exit codes: " + "; ".join(f"{int(c)} {m}" for c, m in MEANINGS[command].items())
