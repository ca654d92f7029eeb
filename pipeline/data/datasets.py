"""Real datasets as normalised in-memory tensors with deterministic train/val/test splits.

Every loader returns the same :class:`Splits` record, so the rest of the pipeline never knows
where images came from. The reward is scored on ``val``, carved deterministically from the
training set; ``test`` is kept for final reports only (the public N2N code scored rewards on
the test set, which leaks it into the search). Nothing is downloaded unless ``download=True``.

Supported names:

- ``digits``: scikit-learn's ``load_digits`` (1x8x8, ships inside scikit-learn);
- ``fashion-mnist``: the original idx ``.gz`` files in a folder, by default
  ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``);
- ``mnist``, ``cifar10``, ``cifar100``, ``svhn``: torchvision datasets under ``root``;
- ``imagefolder``: a user's folder of ``class/image`` files (with optional ``train/``,
  ``test/`` subfolders).
"""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config.schema import RunConfig

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the idx files."""
DEFAULT_ROOT = Path("data")
"""Default root for torchvision datasets, relative to the working directory."""
DATASETS = (
    "digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "imagefolder", "arrays",
)  # fmt: skip
ARRAY_FILES = {"train": "train.npz", "val": "val.npz", "test": "test.npz"}
"""The files of an ``arrays`` dataset (written by :func:`save_arrays`), each with ``x`` and ``y``."""

_TEST_SEED = 12345
"""Seed of the digits test split: fixed, so that no run seed can move test images into train."""

Array = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Splits:
    """A dataset as three (images, labels) pairs of CPU tensors.

    Images are float32 ``[N, C, H, W]``, normalised with the training split's per-channel mean
    and standard deviation; labels are int64 ``[N]``.
    """

    name: str
    train: Array
    val: Array
    test: Array
    num_classes: int
    input_shape: tuple[int, int, int]
    """(channels, height, width) of one image."""
    mean: tuple[float, ...] = ()
    """Per-channel mean subtracted from the raw [0, 1] pixels."""
    std: tuple[float, ...] = ()
    """Per-channel standard deviation the pixels were divided by."""

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (sizes and shapes), for logs and metrics."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "train": len(self.train[1]),
            "val": len(self.val[1]),
            "test": len(self.test[1]),
        }


def load_dataset(
    name: str,
    root: str | Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    download: bool = False,
    max_train: int | None = None,
    max_eval: int | None = None,
    image_size: int = 32,
) -> Splits:
    """Loads a dataset by name and splits it into train, validation and test tensors.

    Args:
        name: one of :data:`DATASETS`.
        root: folder holding the data; defaults to :data:`FASHION_MNIST_DIR` for Fashion-MNIST
            and ``./data`` for torchvision datasets. Required for ``imagefolder``.
        val_fraction: share of the training set held out (stratified) as validation data.
        seed: seed of the train/validation split.
        download: let torchvision download a missing dataset into ``root``.
        max_train: keep at most this many training examples (a deterministic subset), for fast
            tests and benchmarks.
        max_eval: keep at most this many validation and test examples each.
        image_size: side length images are resized to, for ``imagefolder`` only.

    Raises:
        ValueError: unknown name, bad split settings, or data missing or malformed at the path.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction {val_fraction!r} must lie strictly between 0 and 1")
    for label, value in (("max_train", max_train), ("max_eval", max_eval)):
        if value is not None and value < 1:
            raise ValueError(f"{label} {value!r} must be a positive number of examples or None")

    if name == "arrays":
        return load_arrays(root)
    if name == "digits":
        (x_tr, y_tr), (x_te, y_te) = _digits()
    elif name == "fashion-mnist":
        (x_tr, y_tr), (x_te, y_te) = _idx_folder(Path(root) if root else FASHION_MNIST_DIR)
    elif name == "imagefolder":
        if root is None:
            raise ValueError(
                "dataset 'imagefolder' needs root=FOLDER holding one subfolder per class"
            )
        (x_tr, y_tr), (x_te, y_te) = _image_folder(Path(root), image_size)
    else:
        (x_tr, y_tr), (x_te, y_te) = _torchvision(
            name, Path(root) if root else DEFAULT_ROOT, download
        )

    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    train_idx, val_idx = stratified_split(y_tr, val_fraction, seed)
    if max_train is not None:
        train_idx = train_idx[:max_train]
    test_idx = np.arange(len(y_te))
    if max_eval is not None:
        val_idx = val_idx[:max_eval]
        test_idx = np.random.default_rng(_TEST_SEED).permutation(len(y_te))[:max_eval]

    mean, std = _channel_stats(x_tr[train_idx])

    def tensors(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> Array:
        xs = (x[idx].astype(np.float32) - mean[:, None, None]) / std[:, None, None]
        return torch.from_numpy(np.ascontiguousarray(xs)), torch.from_numpy(y[idx].astype(np.int64))

    splits = Splits(
        name=name,
        train=tensors(x_tr, y_tr, train_idx),
        val=tensors(x_tr, y_tr, val_idx),
        test=tensors(x_te, y_te, test_idx),
        num_classes=num_classes,
        input_shape=tuple(int(d) for d in x_tr.shape[1:]),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )
    logger.info("loaded %s", splits.describe())
    return splits


def save_arrays(
    root: str | Path,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    num_classes: int,
) -> Path:
    """Writes in-memory splits (``train``, ``val`` and optionally ``test``, each ``(x, y)``
    arrays already prepared for the model) as an ``arrays`` dataset in folder ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split, (x, y) in splits.items():
        np.savez(root / ARRAY_FILES[split], x=np.asarray(x, np.float32), y=np.asarray(y, np.int64))
    (root / "meta.json").write_text(json.dumps({"num_classes": int(num_classes)}) + "\n")
    return root


def load_arrays(root: str | Path | None) -> Splits:
    """An ``arrays`` dataset (see :func:`save_arrays`) as :class:`Splits`, unchanged: the
    images are used as given (no split, no normalisation). Without a test split the
    validation split stands in for it, and the summary's test accuracy is a validation one."""
    if root is None:
        raise ValueError("dataset 'arrays' needs root=FOLDER holding train.npz and val.npz")
    root = Path(root)
    missing = [f for s, f in ARRAY_FILES.items() if s != "test" and not (root / f).is_file()]
    if missing or not (root / "meta.json").is_file():
        raise ValueError(
            f"arrays dataset {root} lacks {missing or ['meta.json']}; write it with save_arrays"
        )
    arrays = {}
    for split, file in ARRAY_FILES.items():
        path = root / (file if (root / file).is_file() else ARRAY_FILES["val"])
        with np.load(path) as data:
            arrays[split] = (torch.from_numpy(data["x"]), torch.from_numpy(data["y"]))
    x = arrays["train"][0]
    return Splits(
        name="arrays", train=arrays["train"], val=arrays["val"], test=arrays["test"],
        num_classes=int(json.loads((root / "meta.json").read_text())["num_classes"]),
        input_shape=tuple(int(d) for d in x.shape[1:]),
    )  # fmt: skip


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out) with ``fraction`` of every class held out, shuffled by ``seed``."""
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_held = max(1, round(len(idx) * fraction))
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    kept_idx, held_idx = np.concatenate(kept), np.concatenate(held)
    return rng.permutation(kept_idx), rng.permutation(held_idx)


def _channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of ``[N, C, H, W]`` images in [0, 1] (float64 for accuracy)."""
    mean = x.mean(axis=(0, 2, 3), dtype=np.float64)
    var = (x.astype(np.float64) ** 2).mean(axis=(0, 2, 3)) - mean**2
    std = np.sqrt(np.maximum(var, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def _digits() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's 8x8 digits with a fixed, stratified 20% test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    train_idx, test_idx = stratified_split(y, 0.2, _TEST_SEED)
    train_idx.sort()
    test_idx.sort()
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_folder(
    folder: Path,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST (or MNIST) from the four original idx files, gzipped or not."""
    parts = []
    for split in ("train", "test"):
        images_name, labels_name = _IDX_FILES[split]
        images = read_idx(_find_idx(folder, images_name))
        labels = read_idx(_find_idx(folder, labels_name))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"idx files in {folder} for the {split} split hold {images.shape} images and "
                f"{labels.shape} labels; reinstall them (apt-get install --reinstall dataset-fashion-mnist)"
            )
        parts.append(((images.astype(np.float32) / 255.0)[:, None], labels.astype(np.int64)))
    return parts[0], parts[1]


def _find_idx(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"Fashion-MNIST file {folder / (stem + '.gz')} is missing; install it with "
        "'apt-get install dataset-fashion-mnist' or pass root=FOLDER holding the four idx files"
    )


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Reads one idx file (the MNIST format: magic, dimensions, big-endian data), gzipped or not.

    Raises:
        ValueError: the file is truncated, not gzip, or not an idx file.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise ValueError(
            f"{path} cannot be read as gzip ({err}); reinstall it (apt-get install --reinstall "
            "dataset-fashion-mnist)"
        ) from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number); reinstall the dataset")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4")) if ndim else ()
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path} holds {len(raw)} bytes but its header {shape} needs {expected}; the file is "
            "truncated or corrupt: reinstall the dataset"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


_TORCHVISION = {
    "mnist": "MNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
    "svhn": "SVHN",
}


def _torchvision(
    name: str, root: Path, download: bool
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A torchvision dataset's raw arrays, read from ``root`` (downloaded only on request)."""
    from torchvision import datasets

    cls = getattr(datasets, _TORCHVISION[name])
    parts = []
    for train in (True, False):
        split = {"split": "train" if train else "test"} if name == "svhn" else {"train": train}
        try:
            ds = cls(root=str(root), download=download, **split)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted."
            raise ValueError(
                f"dataset {name!r} is missing or corrupt under {root.resolve()} ({err}); "
                f"pass download=True (n2n ... --download) or root=FOLDER holding it"
            ) from err
        data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        labels = getattr(ds, "labels", None)
        labels = np.asarray(ds.targets if labels is None else labels, dtype=np.int64)
        if data.ndim == 3:  # MNIST: N, H, W
            data = data[:, None]
        elif name != "svhn":  # CIFAR: N, H, W, C; SVHN is already N, C, H, W
            data = data.transpose(0, 3, 1, 2)
        parts.append((data.astype(np.float32) / 255.0, labels))
    return parts[0], parts[1]


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _image_folder(
    root: Path, image_size: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A user's images: ``root/class/*.png``, or ``root/train/class/...`` + ``root/test/class/...``.

    Without a ``test/`` folder a fixed, stratified 20% of the images is held out as test data.
    Images are converted to RGB and resized to ``image_size`` x ``image_size``.
    """
    if not root.is_dir():
        raise ValueError(
            f"image folder {root} does not exist; pass root=FOLDER with one subfolder per class"
        )
    train_dir = root / "train" if (root / "train").is_dir() else root
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(
            f"image folder {train_dir} has {len(classes)} class subfolders; it needs at least two "
            "(one folder of images per class)"
        )
    x, y = _read_images(train_dir, classes, image_size)
    test_dir = root / "test"
    if train_dir != root and test_dir.is_dir():
        return (x, y), _read_images(test_dir, classes, image_size)
    train_idx, test_idx = stratified_split(y, 0.2, _TEST_SEED)
    train_idx.sort()
    test_idx.sort()
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])


def _read_images(folder: Path, classes: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    images, labels = [], []
    for label, cls in enumerate(classes):
        for file in sorted((folder / cls).iterdir()) if (folder / cls).is_dir() else []:
            if file.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:
                    pixels = np.asarray(img.convert("RGB").resize((size, size)), dtype=np.float32)
            except (OSError, UnidentifiedImageError) as err:
                raise ValueError(
                    f"image {file} cannot be read ({err}); remove or replace it"
                ) from err
            images.append(pixels.transpose(2, 0, 1) / 255.0)
            labels.append(label)
    if not images:
        raise ValueError(
            f"image folder {folder} holds no images ({', '.join(sorted(_IMAGE_SUFFIXES))})"
        )
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_splits(cfg: RunConfig) -> Splits:
    """The dataset, split into train / val (rewards) / test (final report only)."""
    return load_dataset(**cfg.data.as_kwargs(cfg.seed))
