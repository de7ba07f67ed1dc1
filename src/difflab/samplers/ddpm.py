"""Ancestral sampling of DDPM (Ho et al. 2020, Alg. 2), on any decreasing grid.

Between grid points t > s the step draws from p(x_s | x_t) = N(mu, var): mu is the mean of the exact
posterior q(x_s | x_t, x0) at the predicted x0 (Kingma et al. 2021, eq. 32-33, :func:`process.posterior`);
var is its variance ("small", beta-tilde for adjacent steps) or sigma_{t|s}^2 = 1 - alpha_t^2 / alpha_s^2
("large", beta_t for adjacent steps). A model that learns its variance (``DenoiserOutput.var_interp``)
uses log var = v log beta_{t|s} + (1 - v) log beta-tilde_{t|s}, v = (v_raw + 1) / 2, with the step's own
beta_{t|s} = 1 - alpha_bar_t / alpha_bar_s and posterior variance beta-tilde_{t|s} (Nichol & Dhariwal 2021,
eq. 15 and sec. 4 for strided grids); ``variance`` then does not apply. The step into the clean end adds no
noise and returns the x0 prediction. NFE = number of steps.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.errors import UserError
from difflab.noise import NoiseSource
from difflab.process import interpolate_log_variance, posterior
from difflab.samplers._common import Point, after_step, steps
from difflab.samplers.registry import register_sampler


@register_sampler("ddpm", mean_shift_guidance=True)
def ddpm(
    denoiser: Denoiser, x: Tensor, timesteps: Tensor, noise: NoiseSource, *, variance: Literal["small", "large"] = "small"
) -> Tensor:
    """DDPM ancestral sampler; ``variance="small"`` (beta-tilde) or ``"large"`` (beta), Ho et al. 2020, sec. 3.2;
    a model with a learned variance uses its own (Nichol & Dhariwal 2021, see the module docstring).

    A classifier-guided denoiser of ``form="mean"`` shifts each noisy step's mean by ``s Sigma grad log p(y|x_t)``
    (Dhariwal & Nichol 2021, Alg. 1).
    """
    check_variance(variance)
    for i, cur, nxt in steps(denoiser.schedule, timesteps):
        x, x0 = ddpm_step(denoiser, x, cur, nxt, noise, variance)
        x = after_step(denoiser, i, x, x0)
    return x


def check_variance(variance: str) -> None:
    if variance not in ("small", "large"):
        raise UserError(f"unknown variance {variance!r}; use 'small' (beta-tilde) or 'large' (beta)")


def ddpm_step(denoiser: Denoiser, x: Tensor, cur: Point, nxt: Point, noise: NoiseSource,
              variance: Literal["small", "large"] = "small") -> tuple[Tensor, Tensor]:
    """One ancestral step from ``cur`` to ``nxt``: a draw from p(x_s | x_t) (the module docstring), and the x0
    estimate it used. Into the clean end it returns the posterior mean, which is the x0 estimate."""
    out = denoiser(x, cur.t)
    post = posterior(x, out.x0, nxt.alpha, nxt.sigma, cur.alpha, cur.sigma)
    if nxt.clean:
        return post.mean, out.x0
    beta = 1.0 - (cur.alpha / nxt.alpha) ** 2
    if out.var_interp is not None:  # learned: log var interpolated on this step (Nichol & Dhariwal 2021, sec. 4)
        log_var = interpolate_log_variance(out.var_interp, math.log(post.var), math.log(beta))
        var, std = log_var.exp(), (0.5 * log_var).exp()
    else:
        var = post.var if variance == "small" else beta
        std = math.sqrt(var)
    shift = getattr(denoiser, "ancestral_shift", None) if getattr(denoiser, "form", "eps") == "mean" else None
    mean = post.mean if shift is None else shift(x, cur.t, post.mean, var)  # classifier guidance, Alg. 1
    return mean + std * noise.like(x), out.x0
