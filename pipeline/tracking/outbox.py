"""Bounded retries and an ordered outbox, so a flaky tracking server costs no record.

:func:`call_with_retries` retries transient failures (connection refused, HTTP 5xx, rate
limits) with exponential backoff and gives up after a fixed number of attempts. An
:class:`Outbox` queues idempotent operations and replays them in order: one that still fails
stays queued for the next call instead of failing the search that produced it.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import requests
from mlflow.exceptions import MlflowException

from pipeline.tracking.redaction import scrub

logger = logging.getLogger(__name__)

T = TypeVar("T")
_RETRIABLE_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff."""

    attempts: int = 6
    """Tries per operation, the first included."""
    first_delay_s: float = 1.0
    """Wait after the first failure; doubled after each further one."""
    max_delay_s: float = 16.0
    """Longest single wait."""


class TrackingError(RuntimeError):
    """An MLflow operation failed for good: retries ran out, or the error is not transient."""

    def __init__(self, message: str, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


def is_transient(err: BaseException) -> bool:
    """Whether retrying may help: network and server-side errors, not bad requests."""
    if isinstance(err, MlflowException):
        return err.error_code in _RETRIABLE_CODES
    return isinstance(err, requests.RequestException | ConnectionError | TimeoutError | OSError)


def reason(err: BaseException) -> str:
    """A one-line, secret-free reason (MLflow wraps a refused socket in a screenful of text)."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    errno = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    return scrub(f"{type(err).__name__}: {errno.group(0) if errno else text}")[:200]


def call_with_retries(fn: Callable[[], T], what: str, policy: RetryPolicy) -> T:
    """Runs ``fn``, retrying transient errors with backoff.

    Args:
        fn: the operation.
        what: what it does, for messages ("log the config").
        policy: how often and how long to retry.

    Raises:
        TrackingError: the error was not transient, or the last attempt failed too.
    """
    delay = policy.first_delay_s
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as err:  # MLflow, requests and OS errors, classified by is_transient
            why = reason(err)
            if not is_transient(err):
                raise TrackingError(f"could not {what}: {why}", transient=False) from None
            if attempt == policy.attempts:
                raise TrackingError(f"could not {what} after {attempt} attempts: {why}") from None
            logger.warning(
                "could not %s (%s); retry %d of %d in %.1f s",
                what, why, attempt, policy.attempts - 1, delay,
            )  # fmt: skip
            time.sleep(delay)
            delay = min(delay * 2, policy.max_delay_s)
    raise AssertionError("unreachable")


@dataclass
class _Op:
    what: str
    fn: Callable[[], Any]
    key: str | None


class Outbox:
    """Idempotent operations sent in order; what cannot be sent now is kept for later."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self._ops: deque[_Op] = deque()

    def __len__(self) -> int:
        return len(self._ops)

    def submit(self, what: str, fn: Callable[[], Any], key: str | None = None) -> None:
        """Queues ``fn`` and sends everything queued; never raises for MLflow trouble.

        Args:
            what: what the operation does, for messages.
            fn: the operation; it must be safe to run again after a failure.
            key: operations with the same key are coalesced (one queued copy is enough,
                e.g. re-uploading a whole table that reads the latest rows when it runs).
        """
        if key is None or all(op.key != key for op in self._ops):
            self._ops.append(_Op(what, fn, key))
        self.drain(strict=False)

    def drain(self, strict: bool) -> None:
        """Sends queued operations in order and stops at the first that fails its retries.

        Args:
            strict: raise that failure as :class:`TrackingError` instead of keeping it queued.
                A non-transient failure (a request MLflow rejects) is dropped with an error
                log when not strict, since sending it again cannot succeed.
        """
        while self._ops:
            op = self._ops[0]
            try:
                call_with_retries(op.fn, op.what, self.policy)
            except TrackingError as err:
                if strict:
                    raise
                if not err.transient:
                    logger.error("dropping an MLflow operation that cannot succeed: %s", err)
                    self._ops.popleft()
                    continue
                logger.warning(
                    "MLflow is unavailable (%s); %d operations kept and sent with the next call",
                    err, len(self._ops),
                )  # fmt: skip
                return
            self._ops.popleft()

    def describe_pending(self) -> str:
        """The first pending operation, for a closing error message."""
        return self._ops[0].what if self._ops else "nothing"
