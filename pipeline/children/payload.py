"""What every child's task reads: the training and validation data and the teacher's logits.

The payload is built once per run in the driver (:func:`make_payload`) and put in Ray's object
store, so that env runners and tasks get an ``ObjectRef`` instead of reloading the data; a
task reads its arrays without copies (:func:`payload_tensors`). :func:`fingerprint` hashes
what decides a child's accuracy, the reward cache's key.

The teacher's logits on the training data (a minute of CPU for a Fashion-MNIST ResNet-18) are
kept by content, the teacher's weights and architecture and the images
(:func:`cached_teacher_logits`): in the process, so that the search and the fine-tuning of one
run compute them once, and on disk in ``$N2N_CACHE_DIR`` (default ``~/.cache/n2n``; ``off``
keeps nothing on disk), so that a resumed run, another search or a baseline on the same
teacher and data reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.children.kd import teacher_logits
from pipeline.data.datasets import Splits

logger = logging.getLogger(__name__)


def validation_subset(
    splits: Splits, size: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation images and labels children are scored on: all of them, or a fixed,
    seeded sample of ``size`` in their original order."""
    val_x, val_y = splits.val
    if size is None or size >= len(val_y):
        return val_x, val_y
    generator = torch.Generator().manual_seed(int(seed))
    keep = torch.randperm(len(val_y), generator=generator)[:size].sort().values
    return val_x[keep], val_y[keep]


def make_payload(
    splits: Splits,
    teacher: nn.Module,
    *,
    device: str = "auto",
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The arrays a child's task needs: data, labels and the teacher's logits on the data.

    Args:
        splits: the dataset.
        teacher: the teacher network (left where it is, in its training mode).
        device: where the teacher's logits are computed.
        val: the validation images and labels to score on; default all of ``splits.val``.

    Raises:
        ValueError: the teacher's outputs do not match the dataset's classes.
    """
    x, y = splits.train
    logits = cached_teacher_logits(teacher, x, device=device)
    if logits.shape != (len(y), splits.num_classes):
        raise ValueError(
            f"teacher outputs {tuple(logits.shape[1:])} per example but dataset {splits.name!r} "
            f"has {splits.num_classes} classes; use a teacher trained on it"
        )
    val_x, val_y = val if val is not None else splits.val
    return {
        "train_x": x.numpy(),
        "train_y": y.numpy(),
        "val_x": val_x.numpy(),
        "val_y": val_y.numpy(),
        "teacher_logits": logits.numpy(),
        "input_shape": tuple(splits.input_shape),
    }


_MEMO: OrderedDict[str, torch.Tensor] = OrderedDict()
_MEMO_SIZE = 2  # a search and its fine-tuning share one teacher; a benchmark may hold two


def cached_teacher_logits(
    teacher: nn.Module, x: torch.Tensor, *, device: str = "auto"
) -> torch.Tensor:
    """:func:`~pipeline.children.kd.teacher_logits`, computed once per teacher and images.

    The key hashes the teacher's architecture (its ``repr``), every tensor of its state
    (weights and BatchNorm statistics) and the images, so a retrained or edited teacher, or
    other data, misses. Logits are looked up in this process first, then in the disk cache
    (see the module's docstring); an unreadable cache file is recomputed and rewritten, and a
    cache folder that cannot be written is skipped with a warning.
    """
    started = time.perf_counter()
    key = logits_key(teacher, x)
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    folder = logits_cache_dir()
    path = folder / f"{key}.npy" if folder is not None else None
    logits, source = _read_logits(path, len(x)), "cache"
    if logits is None:
        logits, source = teacher_logits(teacher, x, device=device), "computed"
        if path is not None:
            _write_logits(path, logits)
    logger.info("teacher logits for %d examples %s in %.2fs", len(logits), source,
                time.perf_counter() - started)  # fmt: skip
    _MEMO[key] = logits
    while len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return logits


def logits_key(teacher: nn.Module, x: torch.Tensor) -> str:
    """Content hash of a teacher (architecture and state) and the images it is run on."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(teacher).encode())
    for name, tensor in teacher.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy())
    images = x.detach().cpu().contiguous()
    digest.update(f"{images.dtype}:{tuple(images.shape)}".encode())
    digest.update(images.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def logits_cache_dir() -> Path | None:
    """Where teacher logits are kept on disk: ``$N2N_CACHE_DIR/teacher-logits`` (default
    ``$XDG_CACHE_HOME/n2n`` or ``~/.cache/n2n``); None when ``N2N_CACHE_DIR=off``."""
    root = os.environ.get("N2N_CACHE_DIR")
    if root is not None and root.strip().lower() in ("", "off", "0", "false", "none"):
        return None
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "n2n")
    return Path(root) / "teacher-logits"


def _read_logits(path: Path | None, rows: int) -> torch.Tensor | None:
    if path is None or not path.is_file():
        return None
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        logger.warning("teacher-logit cache %s is unreadable (%s); computing them again", path,
                       err)  # fmt: skip
        return None
    if array.ndim != 2 or array.shape[0] != rows or array.dtype != np.float32:
        logger.warning("teacher-logit cache %s holds %s %s; computing them again", path,
                       array.shape, array.dtype)  # fmt: skip
        return None
    return torch.from_numpy(array)


def _write_logits(path: Path, logits: torch.Tensor) -> None:
    """Writes atomically (a temporary file renamed into place), so a reader never sees half."""
    temporary: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            temporary = f.name
            np.save(f, logits.numpy())
        os.replace(temporary, path)
    except OSError as err:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        logger.warning("could not keep the teacher's logits in %s (%s); set N2N_CACHE_DIR to a "
                       "writable folder, or to off", path.parent, err)  # fmt: skip


def fingerprint(payload: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """Hash of everything that decides a child's accuracy: data, teacher logits, settings."""
    digest = hashlib.sha256()
    for name in ("train_y", "val_y", "teacher_logits"):
        digest.update(np.ascontiguousarray(payload[name]).tobytes())
    digest.update(np.ascontiguousarray(payload["val_x"][:64]).tobytes())
    digest.update(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def payload_tensors(payload: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a payload fetched from Ray's object store, without copies.

    Object-store arrays are read-only; training only reads them, so PyTorch's warning about
    non-writable arrays is silenced rather than paid for with a copy.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return {k: torch.from_numpy(v) for k, v in payload.items() if isinstance(v, np.ndarray)}
