"""Image protocol of difflab's metrics: every image is quantised, made RGB, then resized, the same way.

Parmar et al. 2022 ("On Aliased Resizing and Surprising Subtleties in GAN Evaluation", clean-fid) show
that the resize filter and the quantisation step move FID by several points, so one protocol is used for
generated and reference images alike:

1. **Quantise** to uint8: float images are mapped from ``value_range`` to [0, 1], clipped, and rounded
   as ``round(255 x)`` (what saving a PNG does); uint8 input is kept as it is.
2. **Channels**: greyscale (1 channel) is repeated to RGB; an alpha channel (4 channels) is dropped.
3. **Resize** each image on its own to the extractor's size (299x299 for Inception) with PIL's bicubic
   filter on float32 channels (mode ``"F"``), then clip to [0, 255], exactly as clean-fid's "clean" mode.
   Images of mixed sizes are therefore fine; each is resized from its own size. No re-quantisation.
4. **Scale** to TensorFlow's Inception input ``(x - 128) / 128``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from difflab.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
ImageSource = str | os.PathLike | Tensor | np.ndarray | Image.Image | Iterable


def quantize(x: Tensor | np.ndarray, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Float image(s) in ``value_range`` -> uint8 by ``round(255 * clip((x - lo) / (hi - lo), 0, 1))``."""
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if arr.dtype == np.uint8:
        return arr
    arr = arr.astype(np.float64)
    lo, hi = value_range
    unit = np.clip((arr - lo) / (hi - lo), 0.0, 1.0)
    return np.rint(unit * 255.0).astype(np.uint8)


def to_rgb(img: np.ndarray) -> np.ndarray:
    """uint8 HxW, HxWx1, HxWx3 or HxWx4 -> HxWx3 (grey repeated, alpha dropped)."""
    if img.ndim == 2:
        img = img[:, :, None]
    channels = img.shape[2]
    if channels == 1:
        return np.repeat(img, 3, axis=2)
    if channels == 3:
        return img
    if channels == 4:
        return img[:, :, :3]
    raise UserError(f"image has {channels} channels; metrics take 1 (grey), 3 (RGB) or 4 (RGBA) channels")


def resize_bicubic(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxWxC -> float32 size x size x C: PIL bicubic on float32 channels, clipped to [0, 255]."""
    if img.shape[0] == size and img.shape[1] == size:
        return img.astype(np.float32)
    planes = [np.asarray(Image.fromarray(img[:, :, c].astype(np.float32), mode="F")
                         .resize((size, size), resample=Image.BICUBIC)) for c in range(img.shape[2])]
    return np.clip(np.stack(planes, axis=2), 0.0, 255.0)


def inception_input(images: list[np.ndarray], size: int = 299) -> Tensor:
    """List of uint8 HxWx3 images (any sizes) -> float32 ``(N, 3, size, size)`` in ``(x - 128) / 128``."""
    batch = np.stack([resize_bicubic(to_rgb(img), size) for img in images])
    return torch.from_numpy((batch - 128.0) / 128.0).float().permute(0, 3, 1, 2).contiguous()


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """All image files under ``folder`` (recursive), sorted by path, so the order is reproducible."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"image folder {str(root)!r} does not exist; pass a folder of "
                        f"{'/'.join(IMAGE_EXTENSIONS)} files")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"image folder {str(root)!r} has no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _load_file(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        mode = "L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB"
        return np.asarray(im.convert(mode))


def _split_array(x: Tensor | np.ndarray, value_range: tuple[float, float]) -> Iterator[np.ndarray]:
    """Tensor (C,H,W) / (N,C,H,W), or array (H,W) / (H,W,C) / (N,H,W,C) -> uint8 HxWxC images."""
    if isinstance(x, Tensor):
        if x.ndim not in (3, 4):
            raise UserError(f"image tensor has shape {tuple(x.shape)}; expected (C, H, W) or (N, C, H, W)")
        x = quantize(x, value_range) if x.dtype != torch.uint8 else x.cpu().numpy()
        arr = np.moveaxis(x if x.ndim == 4 else x[None], 1, -1)
    else:
        arr = quantize(x, value_range)
        if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4)):
            arr = arr[None]
        if arr.ndim == 3:
            arr = arr[..., None]
    yield from arr


def iter_images(source: ImageSource, value_range: tuple[float, float] = (0.0, 1.0)) -> Iterator[np.ndarray]:
    """Yield uint8 HxWxC images (C = 1, 3 or 4) one at a time from a folder, tensor(s), arrays or PIL images.

    Float tensors/arrays are taken to lie in ``value_range`` (default [0, 1]; pass (-1, 1) for model
    outputs in [-1, 1]); uint8 ones in [0, 255]. Tensors are channel-first, numpy arrays channel-last.
    """
    if isinstance(source, (str, os.PathLike)):
        for path in list_image_files(source):
            yield _load_file(path)
    elif isinstance(source, Image.Image):
        yield np.asarray(source.convert("L" if source.mode in ("1", "L") else "RGB"))
    elif isinstance(source, (Tensor, np.ndarray)):
        yield from _split_array(source, value_range)
    elif isinstance(source, Iterable):
        for item in source:
            yield from iter_images(item, value_range)
    else:
        raise UserError(f"cannot read images from a {type(source).__name__}; pass a folder path, tensors "
                        "(N, C, H, W), numpy arrays (N, H, W, C) or PIL images")


def batched(images: Iterable[np.ndarray], batch_size: int) -> Iterator[list[np.ndarray]]:
    """Group an image stream into lists of ``batch_size`` (the last one may be shorter)."""
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    batch: list[np.ndarray] = []
    for img in images:
        batch.append(img)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
