"""What one run shares between its steps: the :class:`Job`."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from pipeline.config.schema import RunConfig
from pipeline.data.datasets import Splits
from pipeline.data.teachers import Teacher
from pipeline.tracking.progress import Clock
from pipeline.tracking.rundir import RunDir
from pipeline.tracking.tracker import Tracker

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """Everything one run shares between its steps."""

    cfg: RunConfig
    run_dir: RunDir
    splits: Splits
    teacher: Teacher
    evaluator: tuple[str, dict[str, Any]]
    """Import path and kwargs of the child evaluator, as the envs receive them."""
    evaluator_instance: Any
    console: Console | None
    tracker: Tracker | None
    clock: Clock
    log_name: str
    log: Any = None
    warnings: list[str] = field(default_factory=list)
    source: Teacher | None = None
    """The network children are cut from: the teacher, or its copy trained with a sparsity
    penalty on BatchNorm scales (``search.sparsity_steps``); the teacher stays the KD target."""
    policies: dict[str, str] = field(default_factory=dict)
    """The transferred policy each stage starts from (``search.policy_from``), by stage."""
    limits: dict[str, int] = field(default_factory=dict)
    """The run's budget as counts (``{"params": N, "flops": F}``); empty without one."""

    @property
    def parent(self) -> Teacher:
        """Where children come from (:attr:`source`, else the teacher)."""
        return self.source or self.teacher

    def reward(self, cfg: RunConfig | None = None) -> dict[str, Any]:
        """The env's reward config for ``cfg`` (default the job's), aimed at the budget."""
        return (cfg or self.cfg).reward.as_env_config(self.limits, self.teacher.facts)

    def say(self, text: str) -> None:
        """A progress message: on the console when there is one, else in the log."""
        if self.console is not None:
            self.console.print(text, highlight=False)
        else:
            logger.info(text.replace("[bold]", "").replace("[/]", ""))


def log_name(run_dir: RunDir) -> str:
    return "children-" + hashlib.sha1(str(run_dir.path.resolve()).encode()).hexdigest()[:12]
