"""What every child's task reads: the training and validation data and the teacher's logits.

The payload is built once per run in the driver (:func:`make_payload`) and put in Ray's object
store, so that env runners and tasks get an ``ObjectRef`` instead of reloading the data; a
task reads its arrays without copies (:func:`payload_tensors`). :func:`fingerprint` hashes
what decides a child's accuracy, the reward cache's key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections.abc import Mapping
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
    started = time.perf_counter()
    x, y = splits.train
    logits = teacher_logits(teacher, x, device=device)
    if logits.shape != (len(y), splits.num_classes):
        raise ValueError(
            f"teacher outputs {tuple(logits.shape[1:])} per example but dataset {splits.name!r} "
            f"has {splits.num_classes} classes; use a teacher trained on it"
        )
    logger.info(
        "teacher logits for %d examples in %.2fs", len(logits), time.perf_counter() - started
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
