"""The classic compressors users already know, as methods of the tool: ``n2n baseline METHOD``.

Each method starts from the same teacher, ends with the same KD fine-tuning budget as the
students of ``n2n run`` (``finetune.steps`` at ``finetune.lr``, ``distill``'s loss; see
``pipeline.job.finetune.finetune_settings``) and leaves the same records, so a comparison is at
equal cost:

- ``l1-unstructured``: L1 magnitude pruning of conv/linear weights (``torch.nn.utils.prune``,
  one global threshold or per layer) over ``baseline.amounts``; masks stay on during KD
  fine-tuning and are made permanent before saving. Sparsity alone makes the dense model
  neither smaller nor faster, and its records say so.
- ``slimming``: Network Slimming (Liu et al., 2017): a short KD training with an L1 penalty on
  BatchNorm gammas, then rounds of global channel pruning by gamma, each keeping
  ``baseline.round_factor`` of the parameters until the budget, with KD between rounds. The
  channel coupling is the shrinkage stage's (``envs.surgery``).
- ``structured-l1``: Torch-Pruning's group L1 channel pruning to each parameter budget,
  uniform or global, then KD.
- ``kd-student``: a zoo network (``baseline.student_arch``) at the width that fits each budget,
  trained from scratch with the same KD loss.
- ``random``: the random search of ``n2n run --algo random`` (same child budget as the RL
  search, same fine-tuning).

Budgets come from ``baseline.compression`` (teacher params / factor) and ``baseline.params``.
A method's run directory holds ``config.yaml``, ``students.csv`` (one record per budget or
amount), ``students/<i>/`` (``spec.json`` + ``weights.pt`` + ``metrics.json``) and
``summary.json``. A student whose pruning or training fails keeps a record with its error and
reward -1.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from rich.console import Console
from torch import nn

from envs.checkpoint import save_checkpoint
from envs.costs import count_params, model_costs
from envs.rewards import FAILED_REWARD, ChildScore, make_reward
from pipeline.baselines import compressors
from pipeline.config.schema import RunConfig, validate_config
from pipeline.job.finetune import finetune_settings, train_student_task, training_payload
from pipeline.tracking.rundir import RunDir

logger = logging.getLogger(__name__)

METHODS = ("l1-unstructured", "slimming", "structured-l1", "kd-student", "random")
SPARSITY_NOTE = (
    "unstructured sparsity: the dense model keeps every parameter and runs no faster; only "
    "sparse storage or sparse kernels would gain from the zeros"
)


@dataclass
class _Context:
    """What every method of one ``n2n baseline`` run shares."""

    cfg: RunConfig
    run_dir: RunDir
    splits: Any
    teacher: Any
    """``pipeline.job.run.Teacher``."""
    payload: Any
    """Object-store reference to the training data and teacher logits."""
    test: Any
    """Object-store reference to the test images and labels."""
    console: Console | None
    evaluations: int = 0
    """KD trainings run so far (the methods' "child evaluations")."""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _surgery_lock: threading.Lock = field(default_factory=threading.Lock)

    def surgery(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Runs a model transformation alone: ``torch.fx`` tracing patches ``nn.Module``
        globally, so two traces in two threads corrupt each other."""
        with self._surgery_lock:
            return fn(*args, **kwargs)

    def say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False)
        else:
            logger.info(text)

    def train(
        self, model: nn.Module, steps: int | None = None, bn_l1: float = 0.0, test: bool = True
    ) -> dict[str, Any]:
        """KD-trains ``model`` in place as one Ray task; returns accuracies and timings."""
        cfg = self.cfg
        ref = train_student_task.options(
            num_cpus=cfg.ray.cpus_per_child,
            num_gpus=cfg.ray.gpus_per_child,
            scheduling_strategy="DEFAULT",
        ).remote(
            self.payload,
            model,
            finetune_settings(cfg, steps),
            self.test if test else None,
            max(1, int(cfg.ray.cpus_per_child)),
            bn_l1,
        )
        out = ray.get(ref)
        model.load_state_dict(out.pop("state_dict"))
        with self._lock:
            self.evaluations += 1
        return out


# --------------------------------------------------------------------------- records


def student_record(
    ctx: _Context,
    method: str,
    label: str,
    model: nn.Module,
    trained: dict[str, Any],
    seconds: float,
    evaluations: int,
    **extra: Any,
) -> dict[str, Any]:
    """The record every method (and ``n2n run``) reports for one student."""
    teacher = ctx.teacher.facts
    costs = ctx.surgery(model_costs, model, ctx.splits.input_shape).as_dict()
    counts = compressors.sparsity(model)
    score = ChildScore(
        accuracy=trained["val_accuracy"], teacher_accuracy=teacher["val_accuracy"],
        params=counts["nonzero_params"], teacher_params=teacher["params"],
        flops=costs["flops"], teacher_flops=teacher["flops"],
    )  # fmt: skip
    return {
        "method": method,
        "label": label,
        **costs,
        "nonzero_params": counts["nonzero_params"],
        "compression": teacher["params"] / max(costs["params"], 1),
        "sparse_compression": teacher["params"] / max(counts["nonzero_params"], 1),
        "val_accuracy": trained["val_accuracy"],
        "test_accuracy": trained["test_accuracy"],
        "delta": trained["test_accuracy"] - teacher["test_accuracy"],
        "reward": float(make_reward(ctx.cfg.reward.as_env_config())(score)),
        "kd_steps": trained.get("kd_steps"),
        "child_evaluations": evaluations,
        "wall_time_s": round(seconds, 1),
        "error": None,
        **extra,
    }


def _failed_record(method: str, label: str, err: BaseException, **extra: Any) -> dict[str, Any]:
    cause = getattr(err, "cause", None) or err
    message = str(cause).strip().splitlines()
    return {
        "method": method,
        "label": label,
        "reward": FAILED_REWARD,
        "error": f"{type(cause).__name__}: {message[0] if message else 'no message'}",
        **extra,
    }


# --------------------------------------------------------------------------- methods

Job = Callable[[], tuple[dict[str, Any], nn.Module | None, dict[str, Any] | None]]
"""One student of a method: returns (record, model, spec); the model is saved when given."""


def _l1_unstructured(ctx: _Context) -> list[Job]:
    b = ctx.cfg.baseline

    def job(amount: float) -> Job:
        def run() -> tuple[dict[str, Any], nn.Module, dict[str, Any]]:
            started = time.perf_counter()
            model = ctx.surgery(compressors.prune_unstructured, ctx.teacher.model, amount, b.scope)
            trained = ctx.train(model) if b.finetune else _score_as_is(ctx, model)
            compressors.make_permanent(model)
            record = student_record(
                ctx, "l1-unstructured", f"{b.scope} {amount:.0%}", model, trained,
                time.perf_counter() - started, int(b.finetune), amount=amount, note=SPARSITY_NOTE,
            )  # fmt: skip
            return record, model, ctx.teacher.spec

        return run

    return [job(a) for a in b.amounts]


def _structured_l1(ctx: _Context, targets: list[int]) -> list[Job]:
    b = ctx.cfg.baseline

    def job(target: int) -> Job:
        def run() -> tuple[dict[str, Any], nn.Module, dict[str, Any]]:
            started = time.perf_counter()
            model, spec = ctx.surgery(
                compressors.structured_l1,
                ctx.teacher.model, ctx.teacher.spec, target, mode=b.mode,
                min_channels=ctx.cfg.shrinkage.min_channels,
            )  # fmt: skip
            trained = ctx.train(model)
            record = student_record(
                ctx, "structured-l1", f"{b.mode} <= {target:,}", model, trained,
                time.perf_counter() - started, 1, target_params=target,
            )  # fmt: skip
            return record, model, spec

        return run

    return [job(t) for t in targets]


def _slimming(ctx: _Context, targets: list[int]) -> list[Job]:
    b, cfg = ctx.cfg.baseline, ctx.cfg
    sparse: dict[str, Any] = {}
    sparse_lock = threading.Lock()

    def sparse_teacher() -> tuple[nn.Module, float, int]:
        """The teacher after sparsity training (trained once, shared by every budget)."""
        with sparse_lock:
            if not sparse:
                started = time.perf_counter()
                model = _copy(ctx.teacher.model)
                if b.sparsity_steps > 0 and b.sparsity_l1 > 0:
                    ctx.say(
                        f"slimming: {b.sparsity_steps} KD steps with L1 {b.sparsity_l1:g} on "
                        "BatchNorm gammas"
                    )
                    ctx.train(model, b.sparsity_steps, bn_l1=b.sparsity_l1, test=False)
                    sparse["evaluations"] = 1
                sparse.update(model=model, seconds=time.perf_counter() - started)
            return sparse["model"], sparse["seconds"], sparse.get("evaluations", 0)

    def job(target: int) -> Job:
        def run() -> tuple[dict[str, Any], nn.Module, dict[str, Any]]:
            model, seconds, evaluations = sparse_teacher()
            started = time.perf_counter()
            spec = ctx.teacher.spec
            rounds = 0
            while True:
                params = count_params(model)
                if params <= target:
                    break
                step_target = max(target, int(params * b.round_factor))
                model, spec = ctx.surgery(
                    compressors.slim, model, spec, step_target, cfg.shrinkage.min_channels
                )
                rounds += 1
                left = count_params(model)
                if left >= params:  # every group is at min_channels: the budget is out of reach
                    raise ValueError(
                        f"slimming cannot go below {left:,} params (budget {target:,}); lower "
                        "shrinkage.min_channels or raise the budget"
                    )
                if left <= target:
                    break
                ctx.train(model, b.round_steps or cfg.distill.steps, test=False)
                evaluations += 1
                ctx.say(f"slimming <= {target:,}: round {rounds} left {left:,} params")
            trained = ctx.train(model)
            record = student_record(
                ctx, "slimming", f"<= {target:,}", model, trained,
                seconds + time.perf_counter() - started, evaluations + 1,
                target_params=target, rounds=rounds,
            )  # fmt: skip
            return record, model, spec

        return run

    return [job(t) for t in targets]


def _kd_student(ctx: _Context, targets: list[int]) -> list[Job]:
    b, splits = ctx.cfg.baseline, ctx.splits

    def job(target: int) -> Job:
        def run() -> tuple[dict[str, Any], nn.Module, dict[str, Any]]:
            started = time.perf_counter()
            torch.manual_seed(ctx.cfg.seed)
            model, spec = ctx.surgery(
                compressors.budget_student,
                b.student_arch,
                target,
                list(splits.input_shape),
                splits.num_classes,
            )
            trained = ctx.train(model)
            record = student_record(
                ctx, "kd-student", f"{b.student_arch} <= {target:,}", model, trained,
                time.perf_counter() - started, 1, target_params=target,
                width=spec["base"]["kwargs"].get("width"),
            )  # fmt: skip
            return record, model, spec

        return run

    return [job(t) for t in targets]


def _score_as_is(ctx: _Context, model: nn.Module) -> dict[str, Any]:
    from pipeline.children.distill import evaluate_accuracy

    return {
        "val_accuracy": evaluate_accuracy(model, *ctx.splits.val),
        "test_accuracy": evaluate_accuracy(model, *ctx.splits.test),
        "kd_steps": 0,
    }


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


# --------------------------------------------------------------------------- the run


def run_baseline(
    cfg: RunConfig,
    method: str,
    console: Console | None = None,
    tracker: Any = None,
    splits: Any = None,
    targets: list[int] | None = None,
) -> dict[str, Any]:
    """Runs one classic method in ``cfg.output.run_dir``; returns its summary.

    Args:
        cfg: the run config with resolved paths (the teacher, data, budgets and fine-tuning).
        method: one of :data:`METHODS`.
        console: progress lines go here; None logs them.
        tracker: a started-able ``pipeline.tracking.tracker.Tracker``, or None for no MLflow.
        splits: the loaded dataset, if the caller has it.
        targets: parameter budgets; default ``cfg.baseline.targets(teacher params)``.

    Returns:
        ``{"method", "teacher", "records": [record, ...], "student": best record (by reward
        on validation accuracy), "child_evaluations", "wall_time_s"}``; ``random`` returns
        ``n2n run``'s summary with the same keys added (see :func:`with_records`).
    """
    from pipeline.job import run as compress

    if method not in METHODS:
        raise ValueError(f"unknown baseline method {method!r}: use one of {list(METHODS)}")
    if method == "random":
        return _random(cfg, console, tracker, splits)
    started = time.monotonic()
    run_dir = RunDir(cfg.output.run_dir)
    run_dir.write_config(cfg.to_yaml())
    owns_ray = compress.init_ray(cfg)
    try:
        splits = splits if splits is not None else compress.load_splits(cfg)
        teacher = compress.prepare_teacher(cfg, run_dir, splits, console)
        ctx = _Context(
            cfg, run_dir, splits, teacher, training_payload(splits, teacher.model),
            ray.put((splits.test[0].numpy(), splits.test[1].numpy())), console,
        )  # fmt: skip
        targets = targets or cfg.baseline.targets(teacher.facts["params"])
        if tracker is not None:
            tracker.start(
                cfg.model_dump(mode="json"), teacher.facts, dataset=cfg.data.name,
                tags={"method": method}, run_name=f"{cfg.name}-{method}",
            )  # fmt: skip
        jobs = {
            "l1-unstructured": lambda: _l1_unstructured(ctx),
            "structured-l1": lambda: _structured_l1(ctx, targets),
            "slimming": lambda: _slimming(ctx, targets),
            "kd-student": lambda: _kd_student(ctx, targets),
        }[method]()
        ctx.say(
            f"[bold]{method}[/]: {len(jobs)} students from {teacher.facts['arch']} "
            f"({teacher.facts['params']:,} params), {cfg.finetune.steps} KD steps each"
        )
        records = _run_jobs(ctx, method, jobs)
        summary = _summary(ctx, method, records, time.monotonic() - started)
        run_dir.write_table("students.csv", records)
        run_dir.write_summary(summary)
        if tracker is not None:
            tracker.log_baseline(run_dir.path, summary)
            if cfg.baseline.register_best and summary["student"]:
                from envs.checkpoint import load_checkpoint

                ckpt = load_checkpoint(run_dir.file(f"students/{summary['student']['index']}"))
                tracker.finish(
                    run_dir.path, ckpt.model, ckpt.spec, summary, example_inputs=splits.test[0][:8]
                )
        return summary
    finally:
        if owns_ray:
            ray.shutdown()


def _run_jobs(ctx: _Context, method: str, jobs: list[Job]) -> list[dict[str, Any]]:
    """Runs a method's students concurrently (Ray queues the trainings); saves each one."""

    def run(index: int, job: Job) -> dict[str, Any]:
        try:
            record, model, spec = job()
        except Exception as err:
            logger.debug("%s student %d failed", method, index, exc_info=True)
            record, model, spec = _failed_record(method, f"#{index}", err), None, None
        record["index"] = index
        if model is not None and spec is not None:
            save_checkpoint(ctx.run_dir.file(f"students/{index}"), model, spec, record)
        _say_record(ctx, record)
        return record

    with ThreadPoolExecutor(max(1, len(jobs))) as pool:
        return list(pool.map(run, range(1, len(jobs) + 1), jobs))


def _say_record(ctx: _Context, r: dict[str, Any]) -> None:
    if r.get("error"):
        ctx.say(f"{r['method']} {r['label']}: [red]failed[/]: {r['error']}")
        return
    ctx.say(
        f"{r['method']} {r['label']}: {r['params']:,} params ({r['nonzero_params']:,} non-zero), "
        f"{r['compression']:.1f}x, val {r['val_accuracy']:.4f}, test {r['test_accuracy']:.4f} "
        f"({r['delta'] * 100:+.2f} pts), {r['wall_time_s']:.0f} s"
    )


def _summary(
    ctx: _Context, method: str, records: list[dict[str, Any]], wall: float
) -> dict[str, Any]:
    keys = ("params", "flops", "size_bytes", "val_accuracy", "test_accuracy", "arch")
    good = [r for r in records if not r.get("error")]
    return {
        "name": ctx.cfg.name,
        "method": method,
        "dataset": ctx.cfg.data.name,
        "teacher": {k: ctx.teacher.facts[k] for k in keys},
        "records": records,
        "student": max(good, key=lambda r: r["reward"]) if good else None,
        "child_evaluations": ctx.evaluations,
        "failed": len(records) - len(good),
        "wall_time_s": round(wall, 1),
    }


def _random(cfg: RunConfig, console: Console | None, tracker: Any, splits: Any) -> dict[str, Any]:
    """Random search: ``n2n run --algo random``, summarised like the other methods."""
    from pipeline.job import run as compress

    raw = cfg.model_dump()
    raw["search"]["algo"] = "random"
    summary = compress.run(validate_config(raw), console=console, tracker=tracker, splits=splits)
    return with_records(summary, "random")


def with_records(summary: dict[str, Any], method: str) -> dict[str, Any]:
    """Adds the baseline record keys to an ``n2n run`` summary (its fine-tuned students)."""
    teacher = summary["teacher"]
    records = []
    for s in summary["students"]:
        records.append({
            "method": method, "label": f"rank {s['rank']}" + (" best" if s.get("best") else ""),
            "params": s["params"], "nonzero_params": s["params"], "flops": s["flops"],
            "size_bytes": s["size_bytes"], "compression": teacher["params"] / max(s["params"], 1),
            "sparse_compression": teacher["params"] / max(s["params"], 1),
            "val_accuracy": s["val_accuracy"], "test_accuracy": s["test_accuracy"],
            "delta": s["test_accuracy"] - teacher["test_accuracy"], "reward": s["reward"],
            "kd_steps": s["kd_steps"], "child_evaluations": summary["children"]["evaluated"],
            "wall_time_s": summary["wall_time_s"], "error": None, "best": bool(s.get("best")),
        })  # fmt: skip
    return {
        **summary,
        "method": method,
        "records": records,
        "child_evaluations": summary["children"]["evaluated"],
    }


def records_table(summary: dict[str, Any]) -> Any:
    """The teacher and a method's students as a rich table (what ``n2n baseline`` prints)."""
    from rich.table import Table

    from pipeline.tracking.progress import _pct

    table = Table(title=f"n2n baseline {summary['method']}: {summary.get('name', '')}")
    columns = ("student", "params", "non-zero", "smaller", "FLOPs", "val acc", "test acc", "delta")
    for column in columns:
        table.add_column(column, justify="left" if column == "student" else "right")
    t = summary["teacher"]
    table.add_row(
        "teacher", f"{t['params']:,}", f"{t['params']:,}", "1.0x", f"{t['flops']:,}",
        _pct(t["val_accuracy"]), _pct(t["test_accuracy"]), "",
    )  # fmt: skip
    for r in summary["records"]:
        if r.get("error"):
            table.add_row(r["label"], "failed", r["error"][:60], "", "", "", "", "")
            continue
        best = " best" if summary.get("student") is r else ""
        table.add_row(
            r["label"] + best, f"{r['params']:,}", f"{r['nonzero_params']:,}",
            f"{r['compression']:.1f}x", f"{r['flops']:,}", _pct(r["val_accuracy"]),
            _pct(r["test_accuracy"]), f"{r['delta'] * 100:+.2f} pts",
        )  # fmt: skip
    return table
