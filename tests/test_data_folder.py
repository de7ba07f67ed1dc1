"""Image folders: discovery, resize/crop, bad files, labels from subfolders, errors."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.data import ImageFolderDataset
from difflab.errors import UserError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _bands(width: int, height: int) -> Image.Image:
    """Left quarter red, middle half green, right quarter blue (bands across the long side)."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, : width // 4] = RED
    arr[:, width // 4 : 3 * width // 4] = GREEN
    arr[:, 3 * width // 4 :] = BLUE
    return Image.fromarray(arr)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """cats/a.png, cats/deep/b.JPG, dogs/c.jpeg, dogs/broken.png (truncated), dogs/notes.jpg (text)."""
    root = tmp_path / "images"
    (root / "cats" / "deep").mkdir(parents=True)
    (root / "dogs").mkdir()
    _bands(40, 20).save(root / "cats" / "a.png")
    _bands(40, 20).transpose(Image.Transpose.ROTATE_90).save(root / "cats" / "deep" / "b.JPG", quality=95)
    Image.new("RGB", (16, 16), (10, 20, 30)).save(root / "dogs" / "c.jpeg", quality=100)
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    png = _png_bytes(noisy)
    (root / "dogs" / "broken.png").write_bytes(png[: len(png) // 2])
    (root / "dogs" / "notes.jpg").write_text("not an image")
    (root / "dogs" / "readme.txt").write_text("ignored: not an image extension")
    return root


def _load_warning_free(*args, **kwargs) -> tuple[ImageFolderDataset, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolderDataset(*args, **kwargs)
    return ds, [w for w in caught if issubclass(w.category, UserWarning)]


def test_discovery_skips_bad_files_with_one_warning(tree: Path) -> None:
    ds, caught = _load_warning_free(tree, 16)
    assert [p.relative_to(tree).as_posix() for p in ds.paths] == ["cats/a.png", "cats/deep/b.JPG", "dogs/c.jpeg"]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert str(tree / "dogs" / "broken.png") in message and str(tree / "dogs" / "notes.jpg") in message
    assert "c.jpeg" not in message
    assert len(ds) == 3 and ds.class_names is None and ds.num_classes is None
    item = ds[0]
    assert item["x"].shape == (3, 16, 16) and item["cond"]["label"] == -1 and item["cond"]["caption"] == ""


def test_resize_shorter_side_and_centre_crop(tree: Path) -> None:
    ds, _ = _load_warning_free(tree, 16)
    # 40x20 -> 32x16, crop x 8..24 = original x 10..30: exactly the green band
    for index in (0, 1):  # landscape PNG and portrait JPEG
        pixels = ((ds[index]["x"] + 1) * 127.5).round()
        inner = pixels[:, 2:-2, 2:-2] if index == 0 else pixels[:, 2:-2, 2:-2].transpose(1, 2)
        assert torch.allclose(inner, torch.tensor(GREEN, dtype=torch.float32)[:, None, None], atol=8)
    flat = ((ds[2]["x"] + 1) * 127.5).round()
    assert torch.allclose(flat, torch.tensor([10.0, 20.0, 30.0])[:, None, None], atol=3)


def test_labels_from_subfolders_and_greyscale(tree: Path) -> None:
    ds, _ = _load_warning_free(tree, 8, labels=True, channels=1)
    assert ds.class_names == ["cats", "dogs"] and ds.num_classes == 2
    assert [ds[i]["cond"]["label"] for i in range(3)] == [0, 0, 1]
    assert ds.channels == 1 and ds[0]["x"].shape == (1, 8, 8)
    Image.new("RGB", (8, 8)).save(tree / "loose.png")
    with pytest.raises(UserError, match="loose.png"):
        ImageFolderDataset(tree, 8, labels=True)


def test_lazy_decoding_matches_cache(tree: Path) -> None:
    cached, _ = _load_warning_free(tree, 12)
    lazy, _ = _load_warning_free(tree, 12, max_cache_bytes=0)
    assert lazy._cache is None and cached._cache is not None
    for i in range(len(cached)):
        assert torch.equal(cached[i]["x"], lazy[i]["x"])


def test_num_images_limit(tree: Path) -> None:
    ds, _ = _load_warning_free(tree, 8, num_images=2)
    assert len(ds) == 2
    with pytest.raises(UserError, match="num_images=9"):
        ImageFolderDataset(tree, 8, num_images=9)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(UserError, match="not a directory"):
        ImageFolderDataset(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_text("not a jpeg")
    with pytest.raises(UserError, match="none of the 1 image files"):
        ImageFolderDataset(tmp_path / "bad")
    with pytest.raises(UserError, match="channels"):
        ImageFolderDataset(tmp_path, channels=4)
