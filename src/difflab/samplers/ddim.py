"""DDIM (Song et al. 2021a), deterministic for eta = 0 and DDPM-like for eta = 1.

Step t -> s (eq. 12): x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z, z ~ N(0, I), with
c = eta sqrt(sigma_s^2 / sigma_t^2 (1 - alpha_t^2 / alpha_s^2)) (eq. 16). For eta = 0 this is the
Euler step of the probability-flow ODE dx~/ds = eps (eq. 14). NFE = number of steps.
"""

from __future__ import annotations

import math

from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.noise import NoiseSource
from difflab.samplers._common import Point, after_step, check_eta, steps
from difflab.samplers.registry import register_sampler


@register_sampler("ddim")
def ddim(denoiser: Denoiser, x: Tensor, timesteps: Tensor, noise: NoiseSource, *, eta: float = 0.0) -> Tensor:
    """DDIM sampling with noise level ``eta`` in [0, 1] (Song et al. 2021a, eq. 12 and 16)."""
    check_eta(eta)
    for i, cur, nxt in steps(denoiser.schedule, timesteps):
        x, x0 = ddim_step(denoiser, x, cur, nxt, noise, eta)
        x = after_step(denoiser, i, x, x0)
    return x


def ddim_step(denoiser: Denoiser, x: Tensor, cur: Point, nxt: Point, noise: NoiseSource, eta: float = 0.0) -> tuple[Tensor, Tensor]:
    """One DDIM step from ``cur`` to ``nxt`` (eq. 12 with c of eq. 16), and the x0 estimate it used."""
    out = denoiser(x, cur.t)
    c = eta * nxt.sigma / cur.sigma * math.sqrt(max(1.0 - (cur.alpha / nxt.alpha) ** 2, 0.0))
    x = nxt.alpha * out.x0 + math.sqrt(max(nxt.sigma**2 - c**2, 0.0)) * out.eps
    if c > 0.0:
        x = x + c * noise.like(x)
    return x, out.x0
