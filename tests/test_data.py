"""Pixel conversions, PIL helpers, the scikit-learn digits and the build_dataset factory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MNIST_FILES, require_shared_data
from PIL import Image

from difflab.data import (
    DigitsDataset,
    ImageFolderDataset,
    MNISTDataset,
    ShapesDataset,
    build_dataset,
    dataset_names,
    default_data_dir,
    tensor_to_pil,
    tensor_to_uint8,
    to_pil_grid,
    uint8_to_tensor,
)
from difflab.errors import UserError



def test_uint8_round_trip_is_exact() -> None:
    values = torch.arange(256, dtype=torch.uint8)
    x = uint8_to_tensor(values)
    assert x[0] == -1 and x[-1] == 1
    assert torch.equal(tensor_to_uint8(x), values)
    # rounding to the nearest level, clamping outside [-1, 1]
    nudged = x + 0.49 / 127.5 * torch.where(values % 2 == 0, 1.0, -1.0)
    assert torch.equal(tensor_to_uint8(nudged), values)
    assert tensor_to_uint8(torch.tensor([-3.0, 2.0])).tolist() == [0, 255]


def test_tensor_to_pil_modes() -> None:
    rgb = torch.rand(2, 3, 5, 7) * 2 - 1
    images = tensor_to_pil(rgb)
    assert [im.mode for im in images] == ["RGB", "RGB"] and images[0].size == (7, 5)
    expected = ((rgb[1] + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(np.uint8)
    assert np.array_equal(np.asarray(images[1]), expected)
    grey = tensor_to_pil([torch.zeros(1, 4, 4)])
    assert grey[0].mode == "L" and np.asarray(grey[0]).tolist() == [[128] * 4] * 4


def test_to_pil_grid_layout() -> None:
    images = torch.stack([torch.full((3, 8, 8), v) for v in (-1.0, -0.5, 0.0, 0.5, 1.0)])
    grid = to_pil_grid(images, nrow=3, padding=2, pad_value=1.0)
    assert grid.size == (3 * 10 + 2, 2 * 10 + 2)
    arr = np.asarray(grid)
    for k, v in enumerate([0, 64, 128, 191, 255]):
        top, left = 2 + (k // 3) * 10, 2 + (k % 3) * 10
        assert (arr[top : top + 8, left : left + 8] == v).all()
    assert (arr[0] == 255).all() and (arr[12:22, 22:32] == 255).all()  # padding and the empty slot
    with pytest.raises(UserError, match="nrow"):
        to_pil_grid(images, nrow=0)


def test_digits_match_sklearn() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    native = DigitsDataset(resolution=8)
    assert len(native) == 1797 and native.num_classes == 10 and native.channels == 1
    expected = torch.from_numpy(bunch.images[:, None] / 8.0 - 1.0).float()
    assert torch.allclose(native.images(), expected, atol=0.5 / 127.5 + 1e-6)
    assert [native[i]["cond"]["label"] for i in range(20)] == bunch.target[:20].tolist()
    assert native[3]["cond"]["caption"] == f"a handwritten digit {bunch.target[3]}"
    up = DigitsDataset()  # default 16x16
    assert up.resolution == 16 and up[0]["x"].shape == (1, 16, 16)
    x = up.images()
    assert x.min() >= -1 and x.max() <= 1
    # 2x bilinear upsampling keeps each image's mean intensity up to edge effects
    assert torch.allclose(x.mean(dim=(1, 2, 3)), expected.mean(dim=(1, 2, 3)), atol=0.05)


def test_factory_names_and_defaults(tmp_path: Path) -> None:
    assert dataset_names() == ["cifar10", "digits", "mnist", "shapes"]
    shapes = build_dataset("shapes", num_images=6, seed=2)
    assert isinstance(shapes, ShapesDataset) and shapes.resolution == 32 and len(shapes) == 6
    assert shapes.specs == ShapesDataset(6, seed=2).specs
    assert build_dataset("shapes", 16, num_images=3, exclude=[("circle", "red")]).resolution == 16
    digits = build_dataset("digits", num_images=10)
    assert isinstance(digits, DigitsDataset) and len(digits) == 10 and digits.resolution == 16
    Image.new("RGB", (10, 12), (255, 0, 0)).save(tmp_path / "a.png")
    folder = build_dataset(str(tmp_path), 8)
    assert isinstance(folder, ImageFolderDataset) and folder[0]["x"].shape == (3, 8, 8)


def test_factory_rejects_unknown_name() -> None:
    with pytest.raises(UserError, match="unknown dataset 'celeba'.*cifar10, digits, mnist, shapes"):
        build_dataset("celeba")


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DIFFLAB_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_data_dir("mnist") == tmp_path / ".cache" / "difflab" / "data" / "mnist"
    monkeypatch.setenv("DIFFLAB_DATA_DIR", str(tmp_path))
    assert default_data_dir("mnist") == tmp_path  # no mnist/ subfolder: the root itself
    (tmp_path / "mnist").mkdir()
    assert default_data_dir("mnist") == tmp_path / "mnist"


def test_factory_missing_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DIFFLAB_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte"):
        build_dataset("mnist")
    with pytest.raises(UserError, match="test_batch"):
        build_dataset("cifar10")


def test_factory_uses_env_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFLAB_DATA_DIR", str(require_shared_data(*MNIST_FILES)))
    ds = build_dataset("mnist", 32, num_images=5)
    assert isinstance(ds, MNISTDataset) and len(ds) == 5 and ds[0]["x"].shape == (1, 32, 32)


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_shared_data_skips_locally_and_fails_under_ci(monkeypatch, tmp_path, ci, outcome) -> None:
    import conftest

    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="shared test data missing: .*t10k-images-idx3-ubyte.gz"):
        require_shared_data(*MNIST_FILES)
    (tmp_path / "mnist").mkdir()
    for name in MNIST_FILES:
        (tmp_path / name).write_bytes(b"")
    assert require_shared_data(*MNIST_FILES) == tmp_path
