"""Multistep DPM-Solver++ in data-prediction form (Lu et al. 2022b), ODE and SDE variants.

On a step t -> s with h = lambda_s - lambda_t the exact PF-ODE solution is
x_s = (sigma_s / sigma_t) x_t + sigma_s int_{lambda_t}^{lambda_s} e^{lambda} x0(lambda) dlambda
(Lu et al. 2022b, eq. 8). Multistep solvers expand x0 in lambda with the x0 predictions of earlier
grid points, so NFE = number of steps. The first steps use lower orders (no history yet); with
``lower_order_final`` and fewer than 15 steps the last steps drop order too (as diffusers); the step
into the clean end (lambda = +inf) is always first order and returns the x0 prediction. The history
holds model outputs, not states: a sampling callback that replaces x (inpainting) leaves it as it is.
"""

from __future__ import annotations

import math

from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.noise import NoiseSource
from difflab.samplers._common import Point, after_step, check_eta, steps
from difflab.samplers.registry import register_sampler

LOWER_ORDER_FINAL_BELOW = 15  # steps; diffusers' threshold for lower_order_final
History = list[tuple[float, Tensor]]  # (lambda, x0 prediction), oldest first


def multistep_update(x: Tensor, hist: History, cur: Point, nxt: Point) -> Tensor:
    """One DPM-Solver++ step of order len(hist) (1, 2 or 3) from ``cur`` to ``nxt``.

    Order 1: x_s = (sigma_s/sigma_t) x + alpha_s (1 - e^{-h}) m0. Order 2 (Lu et al. 2022b, Alg. 2):
    m0 is replaced by m0 + (m0 - m1) / (2 r0), r0 = h_prev / h. Order 3: x0 is the quadratic through
    the last three predictions, f1, f2 its first and second derivative in u = (lambda - lambda_t) / h,
    integrated exactly: + alpha_s [(1 - phi1/h) f1 + (1/2 - (h - phi1)/h^2) f2], phi1 = 1 - e^{-h}.
    """
    m0 = hist[-1][1]
    if nxt.clean:
        return m0
    h = nxt.lam - cur.lam
    phi1 = -math.expm1(-h)
    base = (nxt.sigma / cur.sigma) * x
    if len(hist) == 1:
        return base + nxt.alpha * phi1 * m0
    lam1, m1 = hist[-2]
    r0 = (cur.lam - lam1) / h
    d0 = (m0 - m1) / r0
    if len(hist) == 2:
        return base + nxt.alpha * phi1 * (m0 + 0.5 * d0)
    lam2, m2 = hist[-3]
    r1 = (lam1 - lam2) / h
    d1 = (m1 - m2) / r1
    f1 = d0 + r0 / (r0 + r1) * (d0 - d1)
    f2 = 2.0 * (d0 - d1) / (r0 + r1)
    return base + nxt.alpha * (phi1 * m0 + (1.0 - phi1 / h) * f1 + (0.5 - (h - phi1) / h**2) * f2)


def _step_order(order: int, available: int, i: int, n: int, lower_order_final: bool) -> int:
    """Order used at step i of n: limited by the history and, near the end of short runs, by lower_order_final."""
    k = min(order, available)
    if lower_order_final and n < LOWER_ORDER_FINAL_BELOW:
        k = min(k, n - i)
    return k


def multistep(denoiser: Denoiser, x: Tensor, timesteps: Tensor, order: int, lower_order_final: bool = True) -> Tensor:
    """Run DPM-Solver++(``order``M) over the grid."""
    n = len(timesteps) - 1
    hist: History = []
    for i, cur, nxt in steps(denoiser.schedule, timesteps):
        hist = [*hist, (cur.lam, denoiser(x, cur.t).x0)][-order:]
        k = _step_order(order, len(hist), i, n, lower_order_final)
        x = after_step(denoiser, i, multistep_update(x, hist[-k:], cur, nxt), hist[-1][1])
    return x


@register_sampler("dpmpp_2m")
def dpmpp_2m(
    denoiser: Denoiser, x: Tensor, timesteps: Tensor, noise: NoiseSource, *, lower_order_final: bool = True
) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022b, Alg. 2; NFE = N."""
    return multistep(denoiser, x, timesteps, 2, lower_order_final)


@register_sampler("dpmpp_3m")
def dpmpp_3m(
    denoiser: Denoiser, x: Tensor, timesteps: Tensor, noise: NoiseSource, *, lower_order_final: bool = True
) -> Tensor:
    """DPM-Solver++(3M): third-order multistep in data prediction (Lu et al. 2022b, sec. 4 / app.); NFE = N."""
    return multistep(denoiser, x, timesteps, 3, lower_order_final)


@register_sampler("dpmpp_2m_sde")
def dpmpp_2m_sde(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    noise: NoiseSource,
    *,
    eta: float = 1.0,
    lower_order_final: bool = True,
) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, sec. 5 / app.), with Langevin rate ``eta`` in [0, 1].

    Holding x0 linear in lambda over the step, the reverse SDE dx~ = (1 + eta)(x0 - x~) dlambda
    + sqrt(2 eta) s dw (x~ = x / alpha, s = e^{-lambda}) is solved exactly:
    x_s = (sigma_s/sigma_t) e^{-eta h} x + alpha_s (1 - e^{-(1+eta) h}) D + sigma_s sqrt(1 - e^{-2 eta h}) z,
    D = m0 + (m0 - m1) / (2 r0) (midpoint, as Alg. 2). eta = 1 is Lu et al.'s SDE solver, eta = 0 is
    DPM-Solver++(2M). NFE = N.
    """
    check_eta(eta)
    n = len(timesteps) - 1
    prev: tuple[float, Tensor] | None = None
    for i, cur, nxt in steps(denoiser.schedule, timesteps):
        x0 = denoiser(x, cur.t).x0
        if nxt.clean:
            x = after_step(denoiser, i, x0, x0)
            continue
        h = nxt.lam - cur.lam
        d = x0
        if prev is not None and _step_order(2, 2, i, n, lower_order_final) == 2:
            d = x0 + 0.5 * (x0 - prev[1]) * h / (cur.lam - prev[0])
        x = (nxt.sigma / cur.sigma) * math.exp(-eta * h) * x - nxt.alpha * math.expm1(-(1.0 + eta) * h) * d
        if eta > 0:
            x = x + nxt.sigma * math.sqrt(-math.expm1(-2.0 * eta * h)) * noise.like(x)
        x = after_step(denoiser, i, x, x0)
        prev = (cur.lam, x0)
    return x
