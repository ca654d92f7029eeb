"""The knowledge-distillation evaluator: each child trained as a Ray task, results cached.

:class:`KDEvaluator` implements ``envs.evaluation.Evaluator``. The driver calls
:meth:`KDEvaluator.prepare` once: it loads the dataset and the teacher, computes the teacher's
logits on the training data, puts all of it in the Ray object store and creates the run's
reward cache. What reaches the env runners is then small: a few settings plus an
``ObjectRef`` (:meth:`KDEvaluator.config` gives them as plain kwargs for
``env_config["evaluator_config"]``), so no env runner and no task reloads the data.

Each child runs as a ``@ray.remote`` task with its own ``num_cpus``/``num_gpus`` (fractional
GPUs let several small children share one), launched with ``scheduling_strategy="DEFAULT"``
so that tasks started from env runners inside a Tune trial are not captured by the trial's
placement group (where they would wait forever). A child that fails for any reason (an
exception, a NaN loss, CUDA out of memory, its timeout) comes back as
``ChildResult(error="ErrorClass: message")`` and the env scores it -1.

A task lost with its worker or node (a preempted or evicted node, a killed raylet, a worker
killed by Ray's memory monitor) is resubmitted by the evaluator itself, up to ``max_retries``
times, rather than by Ray's own retries, so that the child's record can say it was retried:
``ChildResult.extra["retries"]`` (the ``retries`` column of ``children.csv``). Past its retries
the child fails with the loss as its reason. Errors raised by the child itself are not retried.

With ``early_stop`` a child is scored at a few checkpoints of its training and stopped once
its best reachable reward falls below the k-th best full-budget reward so far (the reward
cache actor keeps that leaderboard; see ``pipeline.children.early_stop``). A stopped child's result
says so (``extra["early_stopped"]``) and its accuracy, hence its reward, is a lower bound.

Longer than 400 lines because one class holds the evaluation protocol whose parts share its
state (the cache connection, the flights in progress, their retries and timeouts); the task
body (``task``), the payload (``payload``), the early-stop plan (``early_stop``) and the
cache itself (``cache``) live in their own modules.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from torch import nn

from envs.evaluation import Child, ChildResult
from pipeline.children.cache import (
    CLAIMED,
    DEFAULT_CACHE_NAME,
    HIT,
    PENDING,
    RewardCache,
    call,
    get_or_create_cache,
)
from pipeline.children.early_stop import EarlyStop, StopPlan
from pipeline.children.kd import KDSettings
from pipeline.children.payload import fingerprint, make_payload, validation_subset
from pipeline.children.task import NOT_CACHEABLE, child_task, error_result, train_child
from pipeline.data.datasets import load_dataset
from pipeline.data.teachers import load_teacher
from pipeline.torch_utils import evaluate_accuracy

logger = logging.getLogger(__name__)


LOST_ERRORS: tuple[type[Exception], ...] = (
    ray.exceptions.NodeDiedError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.LocalRayletDiedError,
    ray.exceptions.OutOfMemoryError,  # the worker was killed by Ray's memory monitor
    ray.exceptions.ObjectLostError,  # also OwnerDiedError: a joined task's owner died
)
"""What ``ray.get`` raises for a child task lost with its worker or node: the evaluator
resubmits the child (up to ``max_retries`` times) instead of scoring it -1."""


@dataclass
class _Flight:
    """One evaluation in flight: what it trains, the ref to wait for, its retries so far."""

    child: Child
    ref: Any
    ours: bool
    """True when this evaluator submitted the task (False: it joined another runner's)."""
    retries: int = 0


class KDEvaluator:
    """Scores children by brief knowledge distillation from the teacher, on a Ray cluster.

    Construct it from plain kwargs (so ``env_config`` can carry ``"pipeline.children.evaluator:KDEvaluator"``
    and a kwargs dict) or pass the instance itself; either way it pickles small.

    Args:
        teacher: teacher checkpoint folder, or the teacher network itself.
        dataset: dataset name, or keyword arguments for ``pipeline.data.datasets.load_dataset``.
        distill: distillation settings (``pipeline.children.kd.KDSettings`` fields).
        num_cpus: CPUs reserved by each child task (also its PyTorch thread count).
        num_gpus: GPUs reserved by each child task; a fraction shares one GPU between children.
        timeout_s: a child whose training runs longer fails (reward -1); None for no limit.
        hard_timeout_s: give up on the tasks still out when none has answered for this long
            (queueing included; it catches hung or unschedulable tasks). Defaults to
            ``2 * timeout_s + 60``.
        max_retries: resubmissions of a child whose task was lost with its worker or node
            (counted in the child's ``extra["retries"]``).
        cache: reuse results of architectures already evaluated with the same settings.
        cache_name: name of the shared cache actor; defaults to one per evaluation fingerprint.
        cache_path: sqlite file that keeps results across runs (e.g. ``runs/x/cache.sqlite``).
        measure_latency: also time inference at batch 1 and ``latency_batch`` after training.
        latency_batch: the larger batch size latency is measured at.
        teacher_accuracy: overrides the measured teacher validation accuracy.
        local: train children in this process instead of as Ray tasks (debugging, no cluster).
        early_stop: stop hopeless children early (``pipeline.children.early_stop.EarlyStop`` fields:
            ``checkpoints``, ``top_k``, ``slack``); needs ``cache`` (the leaderboard lives in
            the cache actor) and children that carry ``reward_at`` (the envs set it). It does
            not enter the fingerprint: a stopped child's cached result, a lower bound marked
            ``early_stopped``, is reused as it is by later runs with or without early stopping.
        val_subset: score children (and the teacher, for the reward) on this many validation
            images, a fixed seeded sample, instead of all of them: each score then costs a
            fraction of the time, at the price of a noisier accuracy. None uses them all.
        payload: set by :meth:`prepare` (an ``ObjectRef`` to the data and teacher logits).
        fingerprint: set by :meth:`prepare` (hash of everything that decides an accuracy).
    """

    def __init__(
        self,
        teacher: str | Path | nn.Module | None = None,
        dataset: str | dict[str, Any] = "digits",
        distill: dict[str, Any] | KDSettings | None = None,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        timeout_s: float | None = 1800.0,
        hard_timeout_s: float | None = None,
        max_retries: int = 3,
        cache: bool = True,
        cache_name: str | None = None,
        cache_path: str | Path | None = None,
        measure_latency: bool = False,
        latency_batch: int = 64,
        teacher_accuracy: float | None = None,
        local: bool = False,
        early_stop: dict[str, Any] | EarlyStop | None = None,
        val_subset: int | None = None,
        payload: Any = None,
        fingerprint: str | None = None,
    ) -> None:
        if teacher is None and payload is None:
            raise ValueError(
                "KDEvaluator needs teacher= (a checkpoint folder or a network) to distill from"
            )
        if payload is None and isinstance(teacher, str | Path) and not Path(teacher).is_dir():
            raise ValueError(
                f"teacher checkpoint {teacher} is not a folder; train one with 'n2n teacher'"
            )
        if num_cpus <= 0 or num_gpus < 0:
            raise ValueError(
                f"child resources num_cpus={num_cpus}, num_gpus={num_gpus}: need num_cpus > 0, num_gpus >= 0"
            )
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s {timeout_s!r} must be > 0 seconds or None")
        if max_retries < 0:
            raise ValueError(f"max_retries {max_retries!r} must be >= 0")
        if early_stop is not None and not cache:
            raise ValueError(
                "early_stop needs cache=True: the leaderboard it compares children against "
                "lives in the reward cache"
            )
        self.early_stop = EarlyStop.from_dict(early_stop) if early_stop is not None else None
        if val_subset is not None and val_subset < 1:
            raise ValueError(f"val_subset {val_subset!r} must be >= 1 images, or None for all")
        self.val_subset = val_subset
        self.teacher = str(teacher) if isinstance(teacher, Path) else teacher
        self.dataset = {"name": dataset} if isinstance(dataset, str) else dict(dataset)
        self.distill_config = KDSettings.from_dict(distill)
        self.num_cpus, self.num_gpus = float(num_cpus), float(num_gpus)
        self.timeout_s = timeout_s
        self.hard_timeout_s = (
            hard_timeout_s
            if hard_timeout_s is not None
            else (2 * timeout_s + 60 if timeout_s is not None else None)
        )
        self.max_retries = max_retries
        self.cache = cache
        self.cache_name = cache_name
        self.cache_path = str(cache_path) if cache_path else None
        self.measure_latency = measure_latency
        self.latency_batch = latency_batch
        self.local = local
        self.payload = payload
        self.fingerprint = fingerprint
        self._teacher_accuracy = teacher_accuracy
        self._cache_handle: Any = None
        self._local_payload: dict[str, Any] | None = None
        self.tasks_submitted = 0
        """Child trainings this instance started (cache hits and joins excluded)."""

    # ----------------------------------------------------------------- preparation
    def prepare(self) -> KDEvaluator:
        """Loads data and teacher, computes teacher logits, ships them to the object store once.

        Idempotent; call it in the driver before handing :meth:`config` (or the instance) to
        env runners. An unprepared evaluator prepares itself on first use, once per process.

        Raises:
            ValueError: the dataset or teacher cannot be loaded or do not fit each other.
        """
        if self.prepared:
            self._connect_cache()
            return self
        splits = load_dataset(**self.dataset)
        val = validation_subset(splits, self.val_subset, int(self.dataset.get("seed", 0)))
        if isinstance(self.teacher, nn.Module):
            teacher = self.teacher
        else:
            teacher = load_teacher(self.teacher, splits).model
        payload = make_payload(splits, teacher, device=self.distill_config.device, val=val)
        if self._teacher_accuracy is None:
            self._teacher_accuracy = evaluate_accuracy(teacher.cpu(), *val)
        logger.info("teacher val accuracy %.4f", self._teacher_accuracy)
        self.fingerprint = fingerprint(
            payload,
            {
                "dataset": self.dataset,
                "distill": self.distill_config.fingerprint(),
                "latency": self.latency_batch if self.measure_latency else None,
            },
        )
        if self.local:
            self._local_payload = payload
            self.payload = "local"
        else:
            self.payload = ray.put(payload)
        self._connect_cache()
        return self

    @property
    def prepared(self) -> bool:
        if self.local:
            return self._local_payload is not None and self.fingerprint is not None
        return (
            self.payload is not None
            and self.fingerprint is not None
            and self._teacher_accuracy is not None
        )

    def config(self) -> dict[str, Any]:
        """Constructor kwargs that rebuild this (prepared) evaluator in another process."""
        self.prepare()
        return {
            "teacher": self.teacher if isinstance(self.teacher, str) else None,
            "dataset": dict(self.dataset),
            "distill": self.distill_config.as_dict(),
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "timeout_s": self.timeout_s,
            "hard_timeout_s": self.hard_timeout_s,
            "max_retries": self.max_retries,
            "cache": self.cache,
            "cache_name": self._resolved_cache_name(),
            "cache_path": self.cache_path,
            "measure_latency": self.measure_latency,
            "latency_batch": self.latency_batch,
            "teacher_accuracy": self._teacher_accuracy,
            "local": self.local,
            "early_stop": self.early_stop.as_dict() if self.early_stop else None,
            "val_subset": self.val_subset,
            "payload": self.payload,
            "fingerprint": self.fingerprint,
        }

    @property
    def teacher_accuracy(self) -> float:
        """The teacher's accuracy on the validation split the children are scored on."""
        if self._teacher_accuracy is None:
            self.prepare()
        return float(self._teacher_accuracy)

    def cache_stats(self) -> dict[str, Any]:
        """The shared cache's counters (hits, misses, joined, size), or {} without a cache."""
        cache = self._connect_cache()
        if cache is None:
            return {}
        return cache.stats() if isinstance(cache, RewardCache) else ray.get(cache.stats.remote())

    def close(self) -> None:
        """Removes the shared cache actor (its sqlite file, if any, stays)."""
        if self._cache_handle is not None and not isinstance(self._cache_handle, RewardCache):
            ray.kill(self._cache_handle)
        self._cache_handle = None

    # ----------------------------------------------------------------- evaluation
    def evaluate(self, child: Child) -> ChildResult:
        """Trains and scores one child, or returns its cached result; never raises for a bad child."""
        return self.evaluate_many([child])[0]

    def evaluate_many(self, children: list[Child]) -> list[ChildResult]:
        """Scores several children at once, as concurrent tasks; results in the same order.

        Children with the same architecture are trained once; cached ones are not trained.
        """
        self.prepare()
        started = time.perf_counter()
        results: list[ChildResult | None] = [None] * len(children)
        cache = self._connect_cache()
        waiting: dict[str, list[int]] = {}  # key -> indices of children waiting for it
        flights: dict[str, _Flight] = {}  # key -> the evaluation they wait for

        for i, child in enumerate(children):
            key = self._key(child)
            if key in waiting:  # a duplicate within the batch: counted as a hit, trained once
                if cache is not None:
                    self._cache_call(cache, "lookup", key)
                waiting[key].append(i)
                continue
            result, ref, ours = self._start(child, key, cache, started)
            if result is not None:
                results[i] = result
                continue
            flights[key] = _Flight(child, ref, ours)
            waiting[key] = [i]

        for key, result in self._collect(flights, cache, started).items():
            flight = flights[key]
            if cache is not None and result.extra.get(NOT_CACHEABLE):
                # not worth keeping; a joined evaluation may also have lost its owner for good
                self._cache_call(cache, "release", key)
            elif cache is not None and flight.ours and not result.cache_hit:
                self._cache_call(cache, "put", key, result.as_dict())
            for n, i in enumerate(waiting[key]):
                shared = n > 0 or not flight.ours or result.cache_hit
                results[i] = _copy_result(result, cache_hit=shared)
            if flight.retries:  # on the record, not in the cache: a later hit was not retried
                results[waiting[key][0]].extra["retries"] = flight.retries
        return [
            r if r is not None else ChildResult(error="RuntimeError: no result") for r in results
        ]

    # ----------------------------------------------------------------- internals
    def _key(self, child: Child) -> str:
        return f"{child.arch_hash}-{self.fingerprint}"

    def _start(
        self, child: Child, key: str, cache: Any, started: float, lost: Any = None
    ) -> tuple[ChildResult | None, Any, bool]:
        """Finds the child's result in the cache, joins its evaluation in flight or submits one.

        Returns ``(result, None, False)`` when the result is known now, else ``(None, ref,
        ours)``: the ``ObjectRef`` to wait for and whether this call submitted it. ``lost`` is a
        ref known to be lost: an entry in flight still holding it is taken over, not joined.
        """
        if cache is not None:
            status, value = self._cache_call(cache, "lookup", key)
            if status == HIT:
                result = _from_cached(value, started)
                self._offer_cached(cache, child, result)
                return result, None, False
            if status == PENDING and (lost is None or value[0] != lost):
                return None, value[0], False
            if status == PENDING:  # its producer lost it too and has not resubmitted yet
                self._cache_call(cache, "release", key)
        try:
            ref = self._submit(child, cache)
        except Exception as err:  # e.g. the child cannot be serialised
            result = error_result(err, started)
            result.extra[NOT_CACHEABLE] = True
            return result, None, False
        if cache is not None:
            status, value = self._cache_call(cache, "claim", key, [ref])
            if status != CLAIMED:  # another runner got there between lookup and claim
                if not self.local:
                    ray.cancel(ref)
                if status == HIT:
                    result = _from_cached(value, started)
                    self._offer_cached(cache, child, result)
                    return result, None, False
                return None, value[0], False
        self.tasks_submitted += 1
        return None, ref, True

    def _submit(self, child: Child, cache: Any) -> Any:
        plan = None
        if self.early_stop is not None and child.reward_at is not None and cache is not None:
            plan = StopPlan(self.early_stop, cache, child.reward_at, child.arch_hash)
        args = (
            child.model,
            self.distill_config,
            self.timeout_s,
            self.latency_batch if self.measure_latency else None,
            max(1, int(self.num_cpus)),
            plan,
        )
        if self.local:
            return ("local", self._local_payload, args)
        # max_retries=0: a lost task comes back to _collect, which resubmits and counts it.
        return child_task.options(
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            max_retries=0,
            retry_exceptions=False,
            scheduling_strategy="DEFAULT",
        ).remote(self.payload, *args)

    def _collect(
        self, flights: dict[str, _Flight], cache: Any, started: float
    ) -> dict[str, ChildResult]:
        """Waits for every evaluation, resubmitting lost ones; failures of Ray become errors."""
        out: dict[str, ChildResult] = {}
        if self.local:
            for key, flight in flights.items():
                _, payload, args = flight.ref
                out[key] = train_child(payload, *args)
            return out
        by_ref = {flight.ref: key for key, flight in flights.items()}
        # The watchdog restarts whenever a child answers, so that a long batch queued on a
        # small cluster is not cut short; it fires only when nothing answers for that long.
        progress = started
        while by_ref:
            timeout = None
            if self.hard_timeout_s is not None:
                timeout = max(0.0, progress + self.hard_timeout_s - time.perf_counter())
            ready, _ = ray.wait(list(by_ref), num_returns=1, timeout=timeout)
            progress = time.perf_counter()
            if not ready:  # nothing answered within the hard timeout
                for ref, key in by_ref.items():
                    try:
                        ray.cancel(ref, force=True)
                    except Exception:  # a joined task belongs to another process
                        logger.debug("could not cancel %s", ref, exc_info=True)
                    out[key] = ChildResult(
                        error=(
                            f"ChildTimeoutError: no result within {self.hard_timeout_s:g} s "
                            "(the task hung or could not be scheduled; check num_cpus/num_gpus)"
                        ),
                        wall_time_s=time.perf_counter() - started,
                        extra={NOT_CACHEABLE: True},
                    )
                break
            key = by_ref.pop(ready[0])
            try:
                out[key] = ray.get(ready[0])
            except LOST_ERRORS as err:
                result = self._retry(key, flights[key], cache, err, started)
                if result is None:
                    by_ref[flights[key].ref] = key
                else:
                    out[key] = result
            except Exception as err:  # the task was cancelled, its arguments were lost, ...
                cause = getattr(err, "cause", None) or err
                result = error_result(cause, started)
                result.extra[NOT_CACHEABLE] = True
                out[key] = result
        return out

    def _retry(
        self, key: str, flight: _Flight, cache: Any, err: Exception, started: float
    ) -> ChildResult | None:
        """Starts a lost evaluation again (or joins another runner's restart); counts it.

        Returns None when it is in flight again (``flight`` then holds the new ref), else the
        child's result: a cache hit, or the loss itself once ``max_retries`` are used up.
        """
        loss = error_result(err, started)
        loss.extra[NOT_CACHEABLE] = True
        if flight.retries >= self.max_retries:
            times = flight.retries + 1
            loss.error += f" (lost {times} time{'s' * (times > 1)}, max_retries={self.max_retries})"
            logger.warning("child %s lost for good: %s", flight.child.arch_hash, loss.error)
            return loss
        flight.retries += 1
        logger.warning(
            "child %s lost with its worker or node, retry %d of %d: %s",
            flight.child.arch_hash, flight.retries, self.max_retries, loss.error,
        )  # fmt: skip
        if flight.ours and cache is not None:
            self._cache_call(cache, "release", key)  # ours: lets the new task claim the key
        result, ref, ours = self._start(flight.child, key, cache, started, lost=flight.ref)
        if result is not None:
            return result
        flight.ref, flight.ours = ref, ours
        return None

    def _connect_cache(self) -> Any:
        if not self.cache:
            return None
        if self._cache_handle is None:
            if self.local:
                self._cache_handle = RewardCache(self.cache_path)
            else:
                self._cache_handle = get_or_create_cache(
                    self._resolved_cache_name(), self.cache_path
                )
        return self._cache_handle

    def _cache_call(self, cache: Any, method: str, *args: Any) -> Any:
        return call(cache, method, *args)

    def _offer_cached(self, cache: Any, child: Child, result: ChildResult) -> None:
        """Enters a cached full-budget result into the leaderboard (it is empty after a resume)."""
        if self.early_stop is None or child.reward_at is None or result.failed:
            return
        if result.extra.get("early_stopped"):
            return
        StopPlan(self.early_stop, cache, child.reward_at, child.arch_hash).offer_result(result)

    def _resolved_cache_name(self) -> str:
        return self.cache_name or f"{DEFAULT_CACHE_NAME}-{self.fingerprint}"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache_handle"] = None  # reconnect by name in the receiving process
        state["tasks_submitted"] = 0  # counts what each copy starts
        if isinstance(self.teacher, nn.Module) and self.prepared and not self.local:
            state["teacher"] = None  # logits and accuracy already carry what children need
        return state


def _from_cached(stored: dict[str, Any], started: float) -> ChildResult:
    result = ChildResult(**stored)
    result.extra = dict(result.extra, original_wall_time_s=result.wall_time_s)
    result.wall_time_s = time.perf_counter() - started
    result.cache_hit = True
    return result


def _copy_result(result: ChildResult, cache_hit: bool) -> ChildResult:
    copy = ChildResult(**result.as_dict())
    copy.cache_hit = cache_hit
    return copy
