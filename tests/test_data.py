"""Dataset loading on real files: scikit-learn digits and Debian's Fashion-MNIST idx files."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import torch

from pipeline.data.datasets import FASHION_MNIST_DIR, load_dataset, read_idx

FASHION_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]
needs_fashion = pytest.mark.skipif(
    not all((FASHION_MNIST_DIR / f).is_file() for f in FASHION_FILES),
    reason=f"Fashion-MNIST idx files are not in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x}


def test_digits_splits_are_normalised_disjoint_and_stratified():
    s = load_dataset("digits", val_fraction=0.1, seed=0)
    assert s.input_shape == (1, 8, 8) and s.num_classes == 10
    assert len(s.train[1]) + len(s.val[1]) + len(s.test[1]) == 1797
    assert len(s.test[1]) == 359  # a fixed 20% of 1797
    for x, y in (s.train, s.val, s.test):
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (1, 8, 8)
    assert abs(s.train[0].mean().item()) < 1e-4 and s.train[0].std().item() == pytest.approx(
        1.0, abs=1e-3
    )
    assert set(s.val[1].tolist()) == set(range(10))  # every class is in validation
    # digits has a few duplicate images, so compare index sets through labels and counts too
    assert len(_rows(s.val[0]) & _rows(s.test[0])) <= 2


def test_splits_are_deterministic_and_seed_moves_only_validation():
    a, b = load_dataset("digits", seed=0), load_dataset("digits", seed=0)
    c = load_dataset("digits", seed=1)
    assert torch.equal(a.val[0], b.val[0]) and torch.equal(a.train[1], b.train[1])
    assert not torch.equal(a.val[1], c.val[1])
    torch.testing.assert_close(a.test[1], c.test[1])  # test split is fixed whatever the seed


def test_subset_controls_limit_sizes():
    s = load_dataset("digits", max_train=100, max_eval=50)
    assert len(s.train[1]) == 100 and len(s.val[1]) == 50 and len(s.test[1]) == 50


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "imagenet"}, "unknown dataset 'imagenet'"),
        ({"name": "digits", "val_fraction": 1.0}, "val_fraction 1.0"),
        ({"name": "digits", "max_train": 0}, "max_train 0"),
        ({"name": "imagefolder"}, "needs root=FOLDER"),
    ],
)
def test_bad_arguments_fail_with_one_sentence(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_dataset(**kwargs)


@needs_fashion
def test_fashion_mnist_from_the_debian_files():
    s = load_dataset("fashion-mnist", val_fraction=0.1)
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    assert (len(s.train[1]), len(s.val[1]), len(s.test[1])) == (54000, 6000, 10000)
    assert torch.bincount(s.val[1]).tolist() == [600] * 10
    assert torch.bincount(s.test[1]).tolist() == [1000] * 10
    assert s.mean[0] == pytest.approx(0.286, abs=0.002)  # the published Fashion-MNIST pixel mean
    assert abs(s.train[0].mean().item()) < 1e-3


def test_missing_fashion_mnist_names_the_path_and_the_package(tmp_path):
    with pytest.raises(
        ValueError,
        match=f"{tmp_path}/train-images-idx3-ubyte.gz is missing.*apt-get install dataset-fashion-mnist",
    ):
        load_dataset("fashion-mnist", root=tmp_path)


@needs_fashion
def test_truncated_idx_file_is_rejected(tmp_path):
    for name in FASHION_FILES:
        shutil.copy(FASHION_MNIST_DIR / name, tmp_path / name)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes())[:-10]))
    with pytest.raises(
        ValueError,
        match="t10k-labels-idx1-ubyte.gz holds 9998 bytes but its header \\(10000,\\) needs 10008",
    ):
        load_dataset("fashion-mnist", root=tmp_path)
    labels.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot be read as gzip"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_read_idx_round_trip(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + np.array(data.shape, dtype=">u4").tobytes() + data.tobytes()
    (tmp_path / "x.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "x").write_bytes(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), data)
    np.testing.assert_array_equal(read_idx(tmp_path / "x"), data)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(tmp_path / "bad")


def test_torchvision_dataset_is_not_downloaded_unless_asked(tmp_path):
    with pytest.raises(
        ValueError, match=f"'cifar10' is missing or corrupt under {tmp_path}.*download=True"
    ):
        load_dataset("cifar10", root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_image_folder_with_train_and_test_subfolders(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for cls, colour in (("cats", 0), ("dogs", 2)):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (12, 10, 3), dtype=np.uint8)
                pixels[..., colour] += 180
                Image.fromarray(pixels).save(folder / f"{i}.png")
    s = load_dataset("imagefolder", root=tmp_path, image_size=16, val_fraction=0.25)
    assert s.input_shape == (3, 16, 16) and s.num_classes == 2
    assert (len(s.train[1]), len(s.val[1]), len(s.test[1])) == (8, 4, 4)
    # the class colour survives loading: red channel is brighter for cats
    cats = s.test[0][s.test[1] == 0]
    assert (cats[:, 0].mean() > cats[:, 2].mean()).item()
    (tmp_path / "train" / "dogs" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png cannot be read"):
        load_dataset("imagefolder", root=tmp_path)


def test_image_folder_needs_two_classes(tmp_path):
    (tmp_path / "only").mkdir()
    with pytest.raises(ValueError, match="has 1 class subfolders"):
        load_dataset("imagefolder", root=tmp_path)
