"""The errors a run reports with their own exit code (``pipeline.config.exits``)."""

from __future__ import annotations


class NoFeasibleStudent(RuntimeError):
    """No child of the search is within the run's budget; the run keeps what it measured."""
