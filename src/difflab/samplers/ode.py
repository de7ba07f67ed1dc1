"""Euler and Heun on the probability-flow ODE in its VE form.

With x~ = x / alpha and s = sigma / alpha, the PF ODE of the VP SDE (Song et al. 2021b, eq. 13) is
exactly dx~/ds = eps(alpha x~, t(s)) (Song et al. 2021a, eq. 14; Karras et al. 2022, eq. 4). Euler
on it equals deterministic DDIM; Heun is Karras et al. 2022, Alg. 1 (2nd order, Euler on the last
step into s = 0 where eps cannot be evaluated). NFE: Euler N, Heun 2N - 1 for N steps ending at t = -1.
"""

from __future__ import annotations

from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.noise import NoiseSource
from difflab.samplers._common import after_step, euler_step, steps
from difflab.samplers.registry import register_sampler


@register_sampler("euler")
def euler(denoiser: Denoiser, x: Tensor, timesteps: Tensor, noise: NoiseSource) -> Tensor:
    """Euler on dx~/ds = eps: x~_next = x~ + (s_next - s) eps (1st order)."""
    for i, cur, nxt in steps(denoiser.schedule, timesteps):
        out = denoiser(x, cur.t)
        x = after_step(denoiser, i, euler_step(x, out.eps, cur, nxt), out.x0)
    return x


@register_sampler("heun")
def heun(denoiser: Denoiser, x: Tensor, timesteps: Tensor, noise: NoiseSource) -> Tensor:
    """Heun on dx~/ds = eps (Karras et al. 2022, Alg. 1): trapezoid of eps at both ends of each step."""
    for i, cur, nxt in steps(denoiser.schedule, timesteps):
        out = denoiser(x, cur.t)
        x_new = euler_step(x, out.eps, cur, nxt)
        if not nxt.clean:
            x_new = euler_step(x, 0.5 * (out.eps + denoiser(x_new, nxt.t).eps), cur, nxt)
        x = after_step(denoiser, i, x_new, out.x0)
    return x
