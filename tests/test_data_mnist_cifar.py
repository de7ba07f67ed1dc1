"""MNIST (IDX) and CIFAR-10 (pickle batches, JPEG zip, extracted folders) read from disk."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CIFAR_FILES, MNIST_FILES, SHARED_DATA, require_shared_data
from PIL import Image

from difflab.data import CIFAR10Dataset, MNISTDataset
from difflab.data.cifar10 import CLASSES
from difflab.errors import UserError

MNIST_DIR, CIFAR_DIR = SHARED_DATA / "mnist", SHARED_DATA / "cifar10"


@pytest.fixture
def needs_mnist() -> None:
    require_shared_data(*MNIST_FILES)


@pytest.fixture(scope="module")
def needs_cifar() -> None:
    require_shared_data(*CIFAR_FILES)


def _pixels(image: torch.Tensor) -> np.ndarray:
    """[-1, 1] (C,H,W) back to uint8 (H,W,C)."""
    return ((image + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.usefixtures("needs_mnist")
def test_mnist_test_split_matches_direct_decode() -> None:
    with gzip.open(MNIST_DIR / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(MNIST_DIR / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    ds = MNISTDataset(MNIST_DIR)  # split="auto": only the test files are there
    assert ds.split == "test" and len(ds) == 10_000 and ds.channels == 1 and ds.resolution == 28
    assert ds.num_classes == 10 and set(ds.labels.tolist()) == set(range(10))
    assert np.array_equal(ds.labels, labels)
    assert np.array_equal(_pixels(ds[0]["x"])[:, :, 0], images[0])
    assert ds[0]["cond"]["caption"] == f"a handwritten digit {labels[0]}"
    with pytest.raises(UserError, match="train-images-idx3-ubyte"):
        MNISTDataset(MNIST_DIR, split="train")


def test_mnist_raw_idx_and_bad_files(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    _write_idx(raw / "train-images-idx3-ubyte", images)
    _write_idx(raw / "train-labels-idx1-ubyte", np.arange(6))
    ds = MNISTDataset(tmp_path, resolution=28)
    assert ds.split == "train" and len(ds) == 6 and ds[5]["cond"]["label"] == 5
    assert np.array_equal(_pixels(ds[3]["x"])[:, :, 0], images[3])
    assert MNISTDataset(tmp_path, resolution=14)[0]["x"].shape == (1, 14, 14)
    _write_idx(raw / "train-labels-idx1-ubyte", np.arange(5))
    with pytest.raises(UserError, match="do not match"):
        MNISTDataset(tmp_path)
    (raw / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(UserError, match="magic"):
        MNISTDataset(tmp_path)


@pytest.fixture(scope="module")
def cifar_zip(needs_cifar: None) -> CIFAR10Dataset:
    return CIFAR10Dataset(CIFAR_DIR)


def test_cifar_jpeg_zip(cifar_zip: CIFAR10Dataset) -> None:
    ds = cifar_zip
    assert ds.split == "test" and len(ds) == 10_000 and ds.resolution == 32 and ds.channels == 3
    assert np.bincount(ds.labels, minlength=10).tolist() == [1000] * 10
    assert ds.class_names == list(CLASSES) and ds[0]["cond"]["caption"] == "a photo of an airplane"
    with zipfile.ZipFile(CIFAR_DIR / "cifar10-test-jpeg.zip") as z:
        first = np.asarray(Image.open(io.BytesIO(z.read("test/airplane/0000.jpg"))).convert("RGB"))
        last = np.asarray(Image.open(io.BytesIO(z.read("test/truck/0999.jpg"))).convert("RGB"))
    assert np.array_equal(_pixels(ds[0]["x"]), first)
    assert np.array_equal(_pixels(ds[9999]["x"]), last) and ds[9999]["cond"]["label"] == 9
    small = CIFAR10Dataset(CIFAR_DIR / "cifar10-test-jpeg.zip", resolution=16, num_images=4)
    assert len(small) == 4 and small[0]["x"].shape == (3, 16, 16)


def _write_batch(path: Path, data: np.ndarray, labels: list[int]) -> None:
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"fake", b"data": data, b"labels": labels, b"filenames": []}, f)


def test_cifar_pickle_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    test_data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    _write_batch(folder / "test_batch", test_data, [3, 1, 9])
    ds = CIFAR10Dataset(tmp_path)
    assert ds.split == "test" and [ds[i]["cond"]["label"] for i in range(3)] == [3, 1, 9]
    got = _pixels(ds[2]["x"])
    for c, i, j in [(0, 0, 0), (1, 5, 7), (2, 31, 30)]:  # row = R plane, G plane, B plane, row-major
        assert got[i, j, c] == test_data[2, c * 1024 + i * 32 + j]
    with pytest.raises(UserError, match="data_batch_1"):
        CIFAR10Dataset(tmp_path, split="train")
    for k in range(1, 6):
        _write_batch(folder / f"data_batch_{k}", rng.integers(0, 256, (2, 3072), dtype=np.uint8), [k, k])
    train = CIFAR10Dataset(folder)  # the batches folder itself works too; "auto" prefers train
    assert train.split == "train" and len(train) == 10 and train[9]["cond"]["label"] == 5


class _Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar_pickle_refuses_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": _Exploit(), b"labels": [0]}, f)
    with pytest.raises(UserError, match="not a CIFAR-10 python batch"):
        CIFAR10Dataset(tmp_path)
    assert "pwned" not in capsys.readouterr().out


def test_cifar_extracted_folder(tmp_path: Path) -> None:
    colors = {"cat": (200, 10, 10), "ship": (10, 10, 200)}
    for name, color in colors.items():
        (tmp_path / "test" / name).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (32, 32), color).save(tmp_path / "test" / name / f"{k:04d}.png")
    ds = CIFAR10Dataset(tmp_path)
    assert [ds[i]["cond"]["label"] for i in range(4)] == [3, 3, 8, 8]
    assert (_pixels(ds[2]["x"]) == colors["ship"]).all()
    (tmp_path / "test" / "unicorn").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "test" / "unicorn" / "0000.png")
    with pytest.raises(UserError, match="unknown CIFAR-10 class folder 'unicorn'"):
        CIFAR10Dataset(tmp_path)
