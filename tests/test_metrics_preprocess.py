"""The image protocol: quantisation, channels, resize (clean-fid's PIL bicubic on float32), image sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.errors import UserError
from difflab.metrics.preprocess import batched, inception_input, iter_images, quantize, resize_bicubic, to_rgb


def test_quantize_rounds_like_saving_a_png():
    x = torch.tensor([-0.5, 0.0, 0.5 / 255, 0.499 / 255, 0.5, 1.0, 2.0])
    assert quantize(x).tolist() == [0, 0, 1, 0, 128, 255, 255]
    assert quantize(torch.tensor([-1.0, 0.0, 1.0]), (-1.0, 1.0)).tolist() == [0, 128, 255]


def test_grey_and_alpha_become_rgb():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = to_rgb(grey)
    assert rgb.shape == (3, 4, 3) and all((rgb[..., c] == grey).all() for c in range(3))
    rgba = np.zeros((2, 2, 4), np.uint8)
    assert to_rgb(rgba).shape == (2, 2, 3)
    with pytest.raises(UserError, match="2 channels"):
        to_rgb(np.zeros((2, 2, 2), np.uint8))


def test_resize_bicubic_reproduces_a_linear_ramp_exactly_inside():
    """Keys' cubic kernel (a = -0.5) is normalised and symmetric, so it reproduces linear functions: away
    from the borders (all 4 taps inside) the output at pixel centre u is the ramp at x = (u + 0.5) n / size - 0.5."""
    n, size = 32, 299
    j = np.arange(n)
    img = (10 + 3 * j[None, :] + 4 * j[:, None])[:, :, None].repeat(3, axis=2).astype(np.uint8)  # up to 227
    out = resize_bicubic(img, size)
    assert out.shape == (size, size, 3) and out.dtype == np.float32
    x = (np.arange(size) + 0.5) * n / size - 0.5
    inside = (x >= 1) & (x <= n - 2)
    want = 10 + 3 * x[None, :] + 4 * x[:, None]
    # float32 taps on values <= 227: 2 passes x 4 taps, each <= 227 * eps32 = 2.7e-5 -> <= 2.2e-4 (seen 1.5e-5).
    np.testing.assert_allclose(out[np.ix_(inside, inside)][..., 0], want[np.ix_(inside, inside)], rtol=0, atol=2.2e-4)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])  # channels are resized independently and alike
    rng = np.random.default_rng(0)
    noisy = resize_bicubic(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), size)
    assert noisy.min() == 0 and noisy.max() == 255  # bicubic overshoots on noise; the overshoot is clipped
    flat = np.full((7, 9, 3), 77, np.uint8)
    # A constant is reproduced everywhere (weights sum to 1); float32 rounding: 2 passes x 4 taps x 77 eps32 = 7.3e-5.
    np.testing.assert_allclose(resize_bicubic(flat, 299), 77.0, rtol=0, atol=7.5e-5)


def test_inception_input_range_and_mixed_sizes():
    imgs = [np.full((28, 28), 0, np.uint8)[:, :, None], np.full((40, 30, 3), 255, np.uint8)]
    x = inception_input(imgs, size=299)
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    # float32, 255 -> 127/128 is exact in binary: seen 0; 1e-5 ~ 84 ulps at 1.
    assert torch.allclose(x[0], torch.tensor(-1.0)) and torch.allclose(x[1], torch.tensor(127 / 128), atol=1e-5)


def test_sources_tensor_array_pil_folder_agree(tmp_path):
    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    for i, img in enumerate(hwc):
        Image.fromarray(img).save(tmp_path / f"{i:02d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    from_folder = list(iter_images(tmp_path))
    from_uint8 = list(iter_images(torch.from_numpy(hwc).permute(0, 3, 1, 2)))
    from_float = list(iter_images(torch.from_numpy(hwc).permute(0, 3, 1, 2).float() / 255))
    from_list = list(iter_images([Image.fromarray(img) for img in hwc]))
    from_numpy = list(iter_images(hwc))
    for imgs in (from_folder, from_uint8, from_float, from_list, from_numpy):
        assert len(imgs) == 3 and all((a == b).all() for a, b in zip(imgs, hwc))


def test_greyscale_batches_keep_one_channel():
    grey = np.zeros((5, 28, 28), np.uint8)
    assert [im.shape for im in iter_images(grey)] == [(28, 28, 1)] * 5
    assert [im.shape for im in iter_images(torch.zeros(2, 1, 6, 6))] == [(6, 6, 1)] * 2


def test_bad_sources_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        list(iter_images(tmp_path / "missing"))
    with pytest.raises(UserError, match="no image files"):
        list(iter_images(tmp_path))
    with pytest.raises(UserError, match="shape"):
        list(iter_images(torch.zeros(4, 4)))
    with pytest.raises(UserError, match="batch_size"):
        list(batched(iter([]), 0))
