"""Singlestep DPM-Solver in noise-prediction form (Lu et al. 2022, Alg. 1 and 2).

On a step t -> s with h = lambda_s - lambda_t the exact solution of the PF ODE is
x_s = (alpha_s / alpha_t) x_t - sigma_s int_{lambda_t}^{lambda_s} e^{lambda - lambda_s} eps dlambda
(Lu et al. 2022, eq. 3.4); order k expands eps to order k - 1 in lambda, using k - 1 intermediate points
inside the step at lambda_t + r h (r1 = 1/2 for order 2; r1 = 1/3, r2 = 2/3 for order 3).

The grid points are the step ends. Into the clean end (lambda = +inf) the step is first order and
returns the x0 prediction. NFE for N steps ending at t = -1: k (N - 1) + 1.
"""

from __future__ import annotations

import math

from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.errors import UserError
from difflab.noise import NoiseSource
from difflab.samplers._common import Point, after_step, euler_step, point_at_lambda, steps
from difflab.samplers.registry import register_sampler

SINGLESTEP_ORDERS = (1, 2, 3)


def _order2_step(denoiser: Denoiser, x: Tensor, eps: Tensor, cur: Point, nxt: Point, r1: float = 0.5) -> Tensor:
    """DPM-Solver-2 (Lu et al. 2022, Alg. 1): one intermediate point at lambda_t + r1 h."""
    h = nxt.lam - cur.lam
    mid = point_at_lambda(denoiser.schedule, cur.lam + r1 * h)
    u = (mid.alpha / cur.alpha) * x - mid.sigma * math.expm1(r1 * h) * eps
    eps_mid = denoiser(u, mid.t).eps
    phi = math.expm1(h)
    return (nxt.alpha / cur.alpha) * x - nxt.sigma * phi * eps - nxt.sigma / (2.0 * r1) * phi * (eps_mid - eps)


def _order3_step(
    denoiser: Denoiser, x: Tensor, eps: Tensor, cur: Point, nxt: Point, r1: float = 1 / 3, r2: float = 2 / 3
) -> Tensor:
    """DPM-Solver-3 (Lu et al. 2022, Alg. 2): intermediate points at lambda_t + r1 h and lambda_t + r2 h."""
    h = nxt.lam - cur.lam
    p1 = point_at_lambda(denoiser.schedule, cur.lam + r1 * h)
    p2 = point_at_lambda(denoiser.schedule, cur.lam + r2 * h)
    u1 = (p1.alpha / cur.alpha) * x - p1.sigma * math.expm1(r1 * h) * eps
    d1 = denoiser(u1, p1.t).eps - eps
    phi2 = math.expm1(r2 * h)
    u2 = (p2.alpha / cur.alpha) * x - p2.sigma * phi2 * eps - p2.sigma * (r2 / r1) * (phi2 / (r2 * h) - 1.0) * d1
    d2 = denoiser(u2, p2.t).eps - eps
    phi = math.expm1(h)
    return (nxt.alpha / cur.alpha) * x - nxt.sigma * phi * eps - nxt.sigma / r2 * (phi / h - 1.0) * d2


def singlestep(denoiser: Denoiser, x: Tensor, timesteps: Tensor, order: int) -> Tensor:
    """Run DPM-Solver-``order`` over the grid (order 1, 2 or 3)."""
    if order not in SINGLESTEP_ORDERS:
        raise UserError(f"DPM-Solver order must be one of {SINGLESTEP_ORDERS}, got {order!r}")
    for i, cur, nxt in steps(denoiser.schedule, timesteps):
        out = denoiser(x, cur.t)
        if order == 1 or nxt.clean:
            x_new = euler_step(x, out.eps, cur, nxt)
        elif order == 2:
            x_new = _order2_step(denoiser, x, out.eps, cur, nxt)
        else:
            x_new = _order3_step(denoiser, x, out.eps, cur, nxt)
        x = after_step(denoiser, i, x_new, out.x0)
    return x


@register_sampler("dpm_solver")
def dpm_solver(denoiser: Denoiser, x: Tensor, timesteps: Tensor, noise: NoiseSource, *, order: int = 3) -> Tensor:
    """Singlestep DPM-Solver of the given order (1, 2 or 3); NFE = order (N - 1) + 1."""
    return singlestep(denoiser, x, timesteps, order)


@register_sampler("dpm_solver_1")
def dpm_solver_1(denoiser: Denoiser, x: Tensor, timesteps: Tensor, noise: NoiseSource) -> Tensor:
    """DPM-Solver-1 (= deterministic DDIM); NFE = N."""
    return singlestep(denoiser, x, timesteps, 1)


@register_sampler("dpm_solver_2")
def dpm_solver_2(denoiser: Denoiser, x: Tensor, timesteps: Tensor, noise: NoiseSource) -> Tensor:
    """DPM-Solver-2, r1 = 1/2; NFE = 2 (N - 1) + 1."""
    return singlestep(denoiser, x, timesteps, 2)


@register_sampler("dpm_solver_3")
def dpm_solver_3(denoiser: Denoiser, x: Tensor, timesteps: Tensor, noise: NoiseSource) -> Tensor:
    """DPM-Solver-3, r1 = 1/3 and r2 = 2/3; NFE = 3 (N - 1) + 1."""
    return singlestep(denoiser, x, timesteps, 3)
