"""n2n orchestration: data, child training, search, tracking and the command line.

From Python: ``from pipeline import compress, baseline`` (see :mod:`pipeline.api`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["baseline", "compress"]


def __getattr__(name: str) -> Any:
    # Imported on first use: ``import pipeline`` (and the n2n command line, which imports
    # its subpackages) should not pay for PyTorch, Ray and MLflow before it needs them.
    if name in __all__:
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
