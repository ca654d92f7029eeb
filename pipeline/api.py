"""n2n from Python, on a model object and data in memory: :func:`compress` and :func:`baseline`.

::

    from pipeline import compress

    result = compress(model, (x_train, y_train), (x_val, y_val), (x_test, y_test), compression=10)
    result.student          # the chosen student, an nn.Module on the CPU
    result.run_dir          # spec.json + weights.pt of every student, the children, the summary

Everything is checked before Ray starts (one ``ValueError`` sentence naming the problem). The
data are written once to ``RUN_DIR/data`` (an ``arrays`` dataset, used as given: no split, no
normalisation) and the model to ``RUN_DIR/teacher`` as a checkpoint whose architecture is a
JSON snapshot (``envs.snapshot``), so nothing depends on ``__main__`` and the run is the same
run as ``n2n run`` makes: the same run directory, MLflow records and registry, and ``n2n run
--resume RUN_DIR`` continues it. A local Ray is started only if none is running, and stopped
again only if it was started here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from envs.checkpoint import load_checkpoint, save_checkpoint
from envs.snapshot import SNAPSHOT, snapshot
from envs.spec import teacher_spec
from pipeline.cluster import preflight
from pipeline.config import environment
from pipeline.config.presets import DEFAULT_PRESET, load_config
from pipeline.config.schema import RunConfig
from pipeline.data.datasets import save_arrays

Data = Any
"""``(x, y)`` tensors or NumPy arrays, or a map-style ``torch.utils.data.Dataset`` of
``(image, label)`` pairs that fits in memory."""


@dataclass
class Result:
    """What a run from Python gives back."""

    student: nn.Module
    """The chosen student, in eval mode on the CPU."""
    students: list[dict[str, Any]]
    """Every fine-tuned student's record (params, FLOPs, accuracies; ``best`` marks the one)."""
    run_dir: Path
    mlflow_run_id: str | None
    summary: dict[str, Any] = field(default_factory=dict)
    """``summary.json``: teacher against student, the budget, the search, the cost."""


def compress(
    model: nn.Module,
    train: Data,
    val: Data,
    test: Data | None = None,
    *,
    params: int | None = None,
    compression: float | None = None,
    flops: float | None = None,
    preset: str | None = None,
    algo: str = "ppo",
    run_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    **overrides: Any,
) -> Result:
    """Searches for a small student of ``model`` by N2N's two stages, as ``n2n run`` does.

    Args:
        model: the trained teacher; any network ``torch.fx`` can trace, built from ``torch.nn``
            layers (a torchvision model, a class defined in a notebook).
        train, val, test: the data (see :data:`Data`), images as the model expects them.
            ``val`` scores the children and chooses the student; ``test`` is measured once at
            the end (``val`` stands in when it is None).
        params, compression, flops: the budget (``n2n run --params/--compression/--flops``);
            the search aims at it and the student is chosen within it.
        preset: the preset whose search settings to use (default ``demo``).
        algo: ``"ppo"``, ``"appo"`` or ``"random"``.
        run_dir: where the run goes (default ``runs/<name>-<time>``).
        tracking_uri: MLflow (default ``sqlite:///mlflow.db``); ``tracking__enabled=False``
            turns it off.
        overrides: config keys with ``__`` for dots, e.g. ``removal__iterations=3``.

    Raises:
        ValueError: bad data or model, found before Ray starts.
        pipeline.config.errors.NoFeasibleStudent: no child fits the budget.
    """
    from pipeline.job.run import run

    cfg, splits = _prepare(model, train, val, test, preset, run_dir, tracking_uri, {
        "search.algo": algo, "budget.params": params, "budget.compression": compression,
        "budget.flops": flops, **_dotted(overrides),
    })  # fmt: skip
    with _tracker(cfg) as tracker:
        summary = run(cfg, tracker=tracker, splits=splits)
    folder = Path(cfg.output.run_dir)
    return Result(
        student=load_checkpoint(folder / "best").model,
        students=summary["students"],
        run_dir=folder,
        mlflow_run_id=tracker.run_id if tracker is not None else None,
        summary=summary,
    )


def baseline(
    method: str,
    model: nn.Module,
    train: Data,
    val: Data,
    test: Data | None = None,
    *,
    params: Sequence[int] | int | None = None,
    compression: Sequence[float] | float | None = None,
    preset: str | None = None,
    run_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    **overrides: Any,
) -> Result:
    """A classic compressor (``n2n baseline METHOD``) on the same terms as :func:`compress`:
    ``"slimming"``, ``"structured-l1"``, ``"kd-student"``, ``"l1-unstructured"`` or
    ``"random"``; ``params``/``compression`` are its budgets (default teacher/10 and /20)."""
    from pipeline.baselines.run import run_baseline

    as_list = lambda v: None if v is None else list(v) if isinstance(v, Sequence) else [v]  # noqa: E731
    extra = {"baseline.params": as_list(params), "baseline.compression": as_list(compression)}
    cfg, splits = _prepare(model, train, val, test, preset, run_dir, tracking_uri,
                           {**extra, **_dotted(overrides)}, name=f"python-{method}")  # fmt: skip
    with _tracker(cfg, register=cfg.baseline.register_best) as tracker:
        summary = run_baseline(cfg, method, tracker=tracker, splits=splits)
    folder = Path(cfg.output.run_dir)
    if method == "random":
        student = load_checkpoint(folder / "best").model
    else:
        if summary["student"] is None:
            raise RuntimeError(f"every {method} student failed; see {folder / 'students.csv'}")
        student = load_checkpoint(folder / "students" / str(summary["student"]["index"])).model
    return Result(
        student=student,
        students=summary["records"],
        run_dir=folder,
        mlflow_run_id=tracker.run_id if tracker is not None else None,
        summary=summary,
    )


# --------------------------------------------------------------------------- checks


def _prepare(
    model: nn.Module,
    train: Data,
    val: Data,
    test: Data | None,
    preset: str | None,
    run_dir: str | Path | None,
    tracking_uri: str | None,
    keys: dict[str, Any],
    name: str = "python",
) -> tuple[RunConfig, Any]:
    """Checks the inputs, writes data and teacher into the run directory; the run's config."""
    environment.apply()
    environment.quiet_ray_loggers()
    if not isinstance(model, nn.Module):
        raise ValueError(f"model is a {type(model).__name__}, not a torch.nn.Module")
    data = {"train": as_arrays(train, "train"), "val": as_arrays(val, "val")}
    if test is not None:
        data["test"] = as_arrays(test, "test")
    shape = data["train"][0].shape[1:]
    for split, (x, _) in data.items():
        if x.shape[1:] != shape:
            raise ValueError(
                f"{split} images have shape {list(x.shape[1:])} but train images {list(shape)}; "
                "give every split images of one shape"
            )
    classes = _output_size(model, data["train"][0][:2])
    for split, (_, y) in data.items():
        if y.min() < 0 or y.max() >= classes:
            raise ValueError(
                f"{split} labels run from {int(y.min())} to {int(y.max())} but the model has "
                f"{classes} outputs; labels must be class indices in [0, {classes})"
            )
    description = snapshot(model)  # refuses what torch.fx cannot trace, in one sentence
    overrides = [f"{k}={v}" for k, v in keys.items() if v is not None]
    if tracking_uri is not None:
        overrides.append(f"tracking.uri={tracking_uri}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = Path(run_dir or f"runs/{name}-{stamp}").expanduser().resolve()
    overrides += [f"name={name}", f"output.run_dir={folder}", "data.name=arrays",
                  f"data.root={folder / 'data'}", f"teacher.checkpoint={folder / 'teacher'}"]  # fmt: skip
    cfg = load_config(preset or DEFAULT_PRESET, overrides).resolve_paths()
    # The run directory is checked before the data and teacher are written into it.
    bare = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"checkpoint": None})})
    preflight.check_run(bare, resume=False)
    save_arrays(folder / "data", data, classes)
    base = {"arch": SNAPSHOT, "kwargs": {}, "input_shape": [int(d) for d in shape],
            "snapshot": description}  # fmt: skip
    was_training = model.training
    save_checkpoint(folder / "teacher", model.eval(), teacher_spec(base))
    model.train(was_training)
    from pipeline.data.datasets import load_splits

    splits = load_splits(cfg)
    preflight.check_teacher(cfg, splits)
    return cfg, splits


def as_arrays(data: Data, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x float32 [N, C, H, W], y int64 [N])`` from tensors, arrays or a map-style Dataset.

    Raises:
        ValueError: one sentence naming the split and what is wrong with it.
    """
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, tuple | list):
        try:
            pairs = [data[i] for i in range(len(data))]
        except TypeError:
            raise ValueError(
                f"{split} is an iterable Dataset; give a map-style one (with __len__ and "
                "__getitem__) or (x, y) tensors"
            ) from None
        if not pairs:
            raise ValueError(f"{split} is an empty Dataset")
        data = (torch.stack([torch.as_tensor(p[0]) for p in pairs]),
                torch.as_tensor([int(p[1]) for p in pairs]))  # fmt: skip
    if not (isinstance(data, tuple | list) and len(data) == 2):
        raise ValueError(
            f"{split} must be (x, y) tensors or arrays, or a map-style Dataset; got "
            f"{type(data).__name__}"
        )
    x, y = (
        d.detach().cpu().numpy() if isinstance(d, torch.Tensor) else np.asarray(d) for d in data
    )
    if x.ndim != 4:
        raise ValueError(f"{split} images have shape {list(x.shape)}; give [N, C, H, W]")
    if len(x) != len(y) or y.ndim != 1:
        raise ValueError(
            f"{split} has {len(x)} images but labels of shape {list(y.shape)}; give one label "
            "per image"
        )
    if len(x) == 0:
        raise ValueError(f"{split} is empty")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"{split} images are {x.dtype}; give floating-point images prepared for the model "
            "(e.g. x.float() / 255, normalised as in its training)"
        )
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise ValueError(f"{split} labels are {y.dtype}; give integer class indices")
    return x.astype(np.float32), y.astype(np.int64)


def _output_size(model: nn.Module, x: np.ndarray) -> int:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(x))
    except Exception as err:
        raise ValueError(
            f"the model cannot run on the train images of shape {list(x.shape[1:])} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    finally:
        model.train(was_training)
    if out.dim() != 2:
        raise ValueError(
            f"the model outputs shape {list(out.shape)}; a classifier gives [N, classes]"
        )
    return int(out.shape[1])


def _dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    """``removal__iterations=3`` as ``{"removal.iterations": 3}``."""
    return {key.replace("__", "."): value for key, value in overrides.items()}


@contextlib.contextmanager
def _tracker(cfg: RunConfig, register: bool = True) -> Any:
    """The run's MLflow tracker (None when tracking is off), closed with the run's outcome."""
    from pipeline.tracking.tracker import tracker_for

    tracker = tracker_for(cfg, register=register)
    with tracker or contextlib.nullcontext():
        yield tracker
