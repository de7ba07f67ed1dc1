"""Resizing helpers shared by the datasets (arrays resized as a batch, PIL images one by one)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from difflab.errors import UserError


def check_resolution(resolution: int) -> int:
    """Validate an image side length (positive int) and return it."""
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise UserError(f"resolution must be a positive integer, got {resolution!r}; e.g. resolution=32")
    return int(resolution)


def check_size(size: int | Sequence[int]) -> tuple[int, int]:
    """An image size as (height, width): an int means a square, a pair ``[H, W]`` may be non-square."""
    if isinstance(size, (list, tuple)):
        if len(size) != 2:
            raise UserError(f"an image size is one int or [height, width], got {list(size)!r}; e.g. [32, 48]")
        return check_resolution(size[0]), check_resolution(size[1])
    side = check_resolution(size)
    return side, side


def resize_array(pixels: np.ndarray, resolution: int | Sequence[int], value_range: float = 255.0) -> np.ndarray:
    """Resize images ``(N, H, W, C)`` to ``(N, R, R, C)`` (or ``(N, H', W', C)`` for ``resolution=[H', W']``) uint8.

    Bilinear interpolation, antialiased when shrinking; input values in ``[0, value_range]``
    are mapped to 0..255 and rounded once, after resizing. Same size: only the rescale.
    """
    x = torch.from_numpy(np.array(pixels, dtype=np.float32)).permute(0, 3, 1, 2)  # a writable copy
    size = check_size(resolution)
    if tuple(x.shape[-2:]) != size:
        shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        x = F.interpolate(x, size=size, mode="bilinear",
                          align_corners=False, antialias=shrinking)
    x = (x * (255.0 / value_range)).round_().clamp_(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def resize_center_crop(image: Image.Image, resolution: int | Sequence[int]) -> Image.Image:
    """Resize (bicubic, antialiased) so the image covers ``resolution`` (a side, or [H, W]) with the least
    scaling, then centre-crop to it."""
    out_h, out_w = check_size(resolution)
    w, h = image.size
    scale = max(out_w / w, out_h / h)
    new_w, new_h = max(out_w, round(w * scale)), max(out_h, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (new_w - out_w) // 2, (new_h - out_h) // 2
    return image.crop((left, top, left + out_w, top + out_h))


def pil_mode(channels: int) -> str:
    """PIL mode for a channel count (1 -> "L", 3 -> "RGB")."""
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels!r}")
    return "L" if channels == 1 else "RGB"


def pil_to_array(image: Image.Image, resolution: int | Sequence[int], channels: int) -> np.ndarray:
    """Convert, resize and centre-crop one PIL image to uint8 ``(H, W, C)``."""
    image = resize_center_crop(image.convert(pil_mode(channels)), resolution)
    arr = np.asarray(image, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr
