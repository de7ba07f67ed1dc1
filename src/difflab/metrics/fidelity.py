"""Full-reference fidelity of restored images (super-resolution, inpainting): PSNR, SSIM and the consistency
error of a super-resolved image with its low-resolution input.

- PSNR = 10 log10(R^2 / MSE) per image, R the data range (2 for images in [-1, 1]).
- SSIM (Wang et al. 2004, eq. 13): l(x, y) c(x, y) s(x, y) with local statistics under an 11x11 Gaussian window of
  sigma 1.5, C1 = (0.01 R)^2, C2 = (0.03 R)^2, averaged over the positions where the window fits inside the
  image (no padding) and over channels, per image.
- Consistency (SR3, Saharia et al. 2021, sec. 4.2): the mean squared error between the low-resolution input and
  the super-resolved image downsampled the way the input was made (area averaging by the scale).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.errors import UserError


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise UserError(f"compare images of one shape (B, C, H, W); got {tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-image PSNR in dB (B,); +inf for identical images."""
    _check_pair(x, y)
    mse = (x.double() - y.double()).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: Tensor, y: Tensor, data_range: float = 2.0, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-image SSIM (B,) of Wang et al. 2004 with a Gaussian window (module docstring)."""
    _check_pair(x, y)
    if min(x.shape[-2:]) < window:
        raise UserError(f"SSIM with an {window}x{window} window needs images at least that large, got {tuple(x.shape[-2:])}")
    c = x.shape[1]
    w = _gaussian_window(window, sigma).to(x.device)[None, None].expand(c, 1, window, window)
    x, y = x.double(), y.double()

    def local_mean(t: Tensor) -> Tensor:
        return F.conv2d(t, w, groups=c)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def consistency_error(high: Tensor, low: Tensor) -> Tensor:
    """Per-image MSE between ``low`` and ``high`` area-downsampled to ``low``'s size (B,)."""
    factor = high.shape[-1] // low.shape[-1]
    if factor < 1 or high.shape[-2:] != (low.shape[-2] * factor, low.shape[-1] * factor) or high.shape[:2] != low.shape[:2]:
        raise UserError(f"the high-resolution images {tuple(high.shape)} are not an integer multiple of {tuple(low.shape)}")
    return (F.avg_pool2d(high.double(), factor) - low.double()).square().flatten(1).mean(1)


def bicubic_upscale(low: Tensor, factor: int) -> Tensor:
    """The baseline: bicubic interpolation by ``factor`` (PyTorch's, a = -0.75), clamped to [-1, 1]."""
    if factor < 1 or not math.isfinite(factor):
        raise UserError(f"scale factor {factor!r} must be a positive integer")
    return F.interpolate(low, scale_factor=factor, mode="bicubic", align_corners=False).clamp(-1, 1)
