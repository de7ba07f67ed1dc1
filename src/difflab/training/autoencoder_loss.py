"""Losses of the KL autoencoder: reconstruction, a pyramid "perceptual" term, KL, and the hinge GAN terms.

Latent diffusion (Rombach et al. 2022, appendix G) trains its autoencoder with
``L = |x - x_rec|_1 + LPIPS(x, x_rec) + kl_weight * KL(q(z|x) || N(0, I)) + lambda * L_GAN``.
LPIPS (Zhang et al. 2018) compares VGG features, and VGG weights cannot be downloaded here, so
difflab replaces it by an L1 loss on a **Laplacian pyramid** of the error (after the Lap1 loss of
Bojanowski et al. 2018), which needs no pretrained network:

* The pyramid splits the error into octaves (band ``j`` holds detail at scale ``2**j`` pixels, the last
  level the local mean). Each band's mean absolute value is added, so an error in colour or layout,
  which lives in the few pixels of the coarse bands, weighs as much as one in edges, which lives in
  the many pixels of the fine band. A plain pixel L1 lets the fine pixels dominate and scores a blurred
  edge and a small colour shift alike; the band split keeps edges (fine bands) and low-frequency fidelity
  (coarse bands) both in view.
* Not SSIM: its normalisation by local variance is ill-conditioned on flat regions (most pixels of
  the shapes and digits datasets), and MS-SSIM needs images of >= 161 pixels for its five scales.

Scale convention: reconstruction terms are means over pixels, and the KL (a sum over latent elements)
is divided by the pixel count ``C * H * W``. Then ``kl_weight`` means what it means in the LDM code,
whose reconstruction loss is a sum over pixels (their ``kl_weight = 1e-6`` carries over unchanged).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

ADAPTIVE_EPS = 1e-4  # delta of Esser et al. 2021, eq. 7
ADAPTIVE_MAX = 1e4  # clamp of the adaptive weight, as in their code


def laplacian_pyramid(x: Tensor, levels: int) -> list[Tensor]:
    """Bands ``[L_0, ..., L_{n-2}, G_{n-1}]`` of ``x`` ``(B, C, H, W)``, ``n <= levels``.

    ``G_0 = x``, ``G_{j+1} = avgpool_2(G_j)``, ``L_j = G_j - up_2(G_{j+1})`` with nearest upsampling
    (Burt & Adelson 1983, with a 2x2 box in place of their 5-tap filter). The sum of the upsampled
    bands gives ``x`` back exactly. Stops early at an odd side.
    """
    bands: list[Tensor] = []
    for _ in range(levels - 1):
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            break
        low = F.avg_pool2d(x, 2)
        bands.append(x - F.interpolate(low, scale_factor=2.0, mode="nearest"))
        x = low
    bands.append(x)
    return bands


def pyramid_l1(x: Tensor, y: Tensor, levels: int = 4) -> Tensor:
    """Per-sample ``sum_j mean |L_j(x) - L_j(y)|`` over the Laplacian pyramid bands, shape ``(B,)``.

    The pyramid is linear, so it is taken once, of the error ``x - y``.
    """
    return sum(band.abs().flatten(1).mean(1) for band in laplacian_pyramid(x - y, levels))


def reconstruction_loss(x: Tensor, x_rec: Tensor, perceptual_weight: float, levels: int = 4) -> dict[str, Tensor]:
    """Per-sample ``l1 = mean |x - x_rec|`` and ``perceptual = pyramid_l1(x, x_rec)``, each ``(B,)``."""
    l1 = (x - x_rec).abs().flatten(1).mean(1)
    perceptual = pyramid_l1(x, x_rec, levels) if perceptual_weight else torch.zeros_like(l1)
    return {"l1": l1, "perceptual": perceptual}


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Per-sample (B,) discriminator hinge loss ``0.5 * (E relu(1 - D(x)) + E relu(1 + D(x_rec)))``, E over
    each sample's patches (Lim & Ye 2017)."""
    return 0.5 * (F.relu(1.0 - logits_real).flatten(1).mean(1) + F.relu(1.0 + logits_fake).flatten(1).mean(1))


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Per-sample (B,) generator (decoder) side of the hinge GAN: ``-E D(x_rec)`` over each sample's patches."""
    return -logits_fake.flatten(1).mean(1)


def adaptive_gan_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor) -> Tensor:
    """``lambda = |grad_{G_L} L_rec| / (|grad_{G_L} L_GAN| + delta)`` at the decoder's last layer.

    Esser et al. 2021, eq. 7: balances the GAN gradient against the reconstruction gradient. Clamped to
    ``[0, 1e4]`` and detached.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + ADAPTIVE_EPS)
    return weight.clamp(0.0, ADAPTIVE_MAX).detach()
