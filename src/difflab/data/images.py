"""Conversions between uint8 pixels, model tensors in [-1, 1] and PIL images.

Every dataset stores pixels as uint8 and every sample leaves the model in [-1, 1];
these helpers are the only place where the two meet, so the mapping is defined once:

    x = v / 127.5 - 1            (uint8 v in 0..255  ->  x in [-1, 1])
    v = round(clamp((x + 1) * 127.5, 0, 255))

The second map is the exact inverse of the first on uint8 values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from difflab.errors import UserError


def uint8_to_tensor(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Map uint8 pixels ``(..., C, H, W)`` to a float32 tensor in [-1, 1]."""
    t = torch.as_tensor(pixels)
    if t.dtype != torch.uint8:
        raise UserError(f"expected uint8 pixels, got dtype {t.dtype}; convert the images to uint8 first")
    return t.to(torch.float32) / 127.5 - 1.0


def tensor_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map a tensor in [-1, 1] to uint8 with rounding; values outside are clamped."""
    x = images.detach().to("cpu", torch.float32)
    return ((x + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def _as_batch(images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack a list of ``(C,H,W)`` tensors, or accept a ``(N,C,H,W)`` / ``(C,H,W)`` tensor."""
    if not isinstance(images, torch.Tensor):
        if len(images) == 0:
            raise UserError("no images to convert; pass at least one (C,H,W) tensor")
        images = torch.stack([torch.as_tensor(im) for im in images])
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] not in (1, 3, 4):
        raise UserError(
            f"expected images shaped (N,C,H,W) with C in 1, 3, 4; got {tuple(images.shape)}"
        )
    return images


def _pil_from_chw(pixels: torch.Tensor) -> Image.Image:
    """Build a PIL image from one uint8 ``(C,H,W)`` tensor (L, RGB or RGBA)."""
    hwc = pixels.permute(1, 2, 0).contiguous().numpy()
    if hwc.shape[2] == 1:
        return Image.fromarray(hwc[:, :, 0], mode="L")
    return Image.fromarray(hwc, mode="RGB" if hwc.shape[2] == 3 else "RGBA")


def tensor_to_pil(images: torch.Tensor | Sequence[torch.Tensor]) -> list[Image.Image]:
    """Convert images in [-1, 1] (a ``(N,C,H,W)`` tensor or a list of ``(C,H,W)``) to PIL images."""
    batch = tensor_to_uint8(_as_batch(images))
    return [_pil_from_chw(im) for im in batch]


def to_pil_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> Image.Image:
    """Tile images in [-1, 1] into one PIL image, ``nrow`` images per row.

    ``padding`` pixels of ``pad_value`` (in [-1, 1], default white) separate and surround tiles.
    """
    if nrow < 1:
        raise UserError(f"nrow must be >= 1, got {nrow}")
    if padding < 0:
        raise UserError(f"padding must be >= 0, got {padding}")
    batch = _as_batch(images).detach().to("cpu", torch.float32)
    n, c, h, w = batch.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = torch.full(
        (c, rows * (h + padding) + padding, cols * (w + padding) + padding), float(pad_value)
    )
    for k in range(n):
        top = padding + (k // cols) * (h + padding)
        left = padding + (k % cols) * (w + padding)
        grid[:, top : top + h, left : left + w] = batch[k]
    return _pil_from_chw(tensor_to_uint8(grid))
