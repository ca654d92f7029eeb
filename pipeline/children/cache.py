"""The reward cache: an architecture already evaluated in a run is never trained again.

Keys are ``"{arch_hash}-{evaluation fingerprint}"``: the canonical hash of the child's spec
(``envs.spec.arch_hash``) and a hash of everything else that decides its accuracy (data,
teacher logits, distillation settings). One cache serves every env runner of a run as a
named Ray actor (no CPU reserved); an optional sqlite file next to the run's outputs keeps
results across runs, so a resumed or repeated run reuses them.

Besides finished results the cache remembers evaluations *in flight*: a second env runner
asking for an architecture another one is training waits for that training (it gets the
producer's ``ObjectRef``) instead of starting its own.

It also keeps the run's *leaderboard*, the rewards of children trained to their full KD
budget, which early stopping (``pipeline.children.early_stop``) compares a child in training against.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import math
import sqlite3
import time
from pathlib import Path
from typing import Any

import ray

logger = logging.getLogger(__name__)

DEFAULT_CACHE_NAME = "n2n-reward-cache"
"""Name prefix of the cache actor; the evaluator appends its evaluation fingerprint."""

HIT, PENDING, MISS, CLAIMED = "hit", "pending", "miss", "claimed"


class RewardCache:
    """Results of child evaluations by key, with hit and miss counters.

    Use it directly in one process, or as a Ray actor through :func:`get_or_create_cache`.
    Results are plain dicts (``ChildResult.as_dict()``) so that they round-trip through JSON.

    Args:
        path: sqlite file to persist results in (created with its folder); None keeps them in
            memory only.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self._done: dict[str, dict[str, Any]] = {}
        self._pending: dict[str, list[Any]] = {}
        self._board: dict[str, float] = {}
        self._anonymous = itertools.count()
        self.hits = self.misses = self.joined = 0
        self._db: sqlite3.Connection | None = None
        self.path = str(path) if path else None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            try:
                self._db = sqlite3.connect(str(path))
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, result TEXT NOT NULL, created REAL)"
                )
                self._db.commit()
            except sqlite3.DatabaseError as err:
                raise ValueError(
                    f"reward cache {path} is not a usable sqlite file ({err}); delete it or pick another path"
                ) from err

    def lookup(self, key: str) -> tuple[str, Any]:
        """``(HIT, result)``, ``(PENDING, [ref])`` for an evaluation in flight, or ``(MISS, None)``.

        A hit or a join is counted here; a miss is counted by :meth:`claim`, when the caller
        commits to training.
        """
        result = self._get(key)
        if result is not None:
            self.hits += 1
            return HIT, result
        if key in self._pending:
            self.hits += 1
            self.joined += 1
            return PENDING, self._pending[key]
        return MISS, None

    def claim(self, key: str, ref_box: list[Any]) -> tuple[str, Any]:
        """Registers an evaluation in flight, unless another caller got there first.

        Args:
            key: the cache key.
            ref_box: ``[ObjectRef]`` of the caller's evaluation task, wrapped in a list so that
                Ray passes the reference itself rather than waiting for its value.

        Returns:
            ``(CLAIMED, None)`` when the caller's evaluation is now the one in flight (a miss),
            else what :meth:`lookup` returns (the caller should cancel its own task).
        """
        status, value = self.lookup(key)
        if status != MISS:
            return status, value
        self.misses += 1
        self._pending[key] = ref_box
        return CLAIMED, None

    def put(self, key: str, result: dict[str, Any]) -> None:
        """Stores a finished result (and persists it when the cache has a file)."""
        self._pending.pop(key, None)
        self._done[key] = result
        if self._db is not None:
            self._db.execute(
                "INSERT OR REPLACE INTO results VALUES (?, ?, ?)",
                (key, json.dumps(result, default=str), time.time()),
            )
            self._db.commit()

    def release(self, key: str) -> None:
        """Forgets an evaluation in flight whose result is not worth keeping (e.g. a timeout)."""
        self._pending.pop(key, None)

    def offer(self, reward: float, key: str | None = None) -> None:
        """Enters the reward of a child trained to its full budget into the leaderboard.

        Only full-budget rewards belong here: a child stopped early has only a lower bound.
        ``key`` (the architecture hash) keeps one entry per architecture, its best reward, so
        that a child evaluated twice does not take two of the top-k places; the leaderboard
        lives in memory only, so after a resume it starts empty (cache hits refill it) and
        early stopping is the more cautious for it. Non-finite rewards are ignored.
        """
        if not math.isfinite(reward):
            return
        key = key if key is not None else f"#{next(self._anonymous)}"
        self._board[key] = max(float(reward), self._board.get(key, -math.inf))

    def kth_best(self, k: int) -> float | None:
        """The k-th best reward in the leaderboard, or None while it holds fewer than ``k``."""
        if k < 1:
            raise ValueError(f"k {k!r} must be >= 1")
        if len(self._board) < k:
            return None
        return heapq.nlargest(k, self._board.values())[-1]

    def stats(self) -> dict[str, Any]:
        """Counters: ``hits`` (served without training, joins included), ``misses`` (trainings
        started), ``joined`` (waits on another caller's training), ``size``, ``pending``."""
        size = len(self._done)
        if self._db is not None:
            size = int(self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0])
        return {
            "hits": self.hits,
            "misses": self.misses,
            "joined": self.joined,
            "size": size,
            "pending": len(self._pending),
            "path": self.path,
        }

    def _get(self, key: str) -> dict[str, Any] | None:
        if key in self._done:
            return self._done[key]
        if self._db is None:
            return None
        row = self._db.execute("SELECT result FROM results WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        self._done[key] = json.loads(row[0])
        return self._done[key]


def get_or_create_cache(name: str, path: str | Path | None = None) -> Any:
    """The run's shared cache actor called ``name``, created (with no CPU reserved) if needed.

    The actor belongs to whoever creates it first: create it in the driver (the evaluator's
    ``prepare`` does) so that it lives as long as the run, not as long as one env runner.
    """
    actor_cls = ray.remote(num_cpus=0, max_restarts=1)(RewardCache)
    return actor_cls.options(
        name=name,
        get_if_exists=True,
        scheduling_strategy="DEFAULT",
        resources={"node:__internal_head__": 0.001},  # outlives any worker node, see search.ON_HEAD
    ).remote(str(path) if path else None)


def call(cache: Any, method: str, *args: Any) -> Any:
    """Calls a cache method on the object itself (local mode) or on its Ray actor."""
    if isinstance(cache, RewardCache):
        return getattr(cache, method)(*args)
    return ray.get(getattr(cache, method).remote(*args))
