"""Resizing helpers shared by the datasets (arrays resized as a batch, PIL images one by one)."""

from __future__ import annotations

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


def resize_array(pixels: np.ndarray, resolution: int, value_range: float = 255.0) -> np.ndarray:
    """Resize square images ``(N, H, W, C)`` to ``(N, R, R, C)`` uint8.

    Bilinear interpolation, antialiased when shrinking; input values in ``[0, value_range]``
    are mapped to 0..255 and rounded once, after resizing. Same size: only the rescale.
    """
    x = torch.from_numpy(np.array(pixels, dtype=np.float32)).permute(0, 3, 1, 2)  # a writable copy
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        shrinking = resolution < max(x.shape[-2:])
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear",
                          align_corners=False, antialias=shrinking)
    x = (x * (255.0 / value_range)).round_().clamp_(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side equals ``resolution`` (bicubic, antialiased), then centre-crop square."""
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def pil_mode(channels: int) -> str:
    """PIL mode for a channel count (1 -> "L", 3 -> "RGB")."""
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels!r}")
    return "L" if channels == 1 else "RGB"


def pil_to_array(image: Image.Image, resolution: int, channels: int) -> np.ndarray:
    """Convert, resize and centre-crop one PIL image to uint8 ``(R, R, C)``."""
    image = resize_center_crop(image.convert(pil_mode(channels)), resolution)
    arr = np.asarray(image, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr
