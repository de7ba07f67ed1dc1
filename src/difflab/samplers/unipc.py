"""UniPC: multistep predictor (UniP) and corrector (UniC) in data-prediction form (Zhao et al. 2023).

On a step t -> s with h = lambda_s - lambda_t the exact PF-ODE solution is
x_s = (sigma_s / sigma_t) x_t + alpha_s int_0^h e^{u - h} x0(lambda_t + u) du (Lu et al. 2022b, eq. 8).
Taylor-expanding x0 gives x_s = (sigma_s/sigma_t) x_t + alpha_s sum_k h^{k+1} phi_{k+1}(-h) x0^(k), with
phi_1(z) = (e^z - 1)/z and phi_{k+1}(z) = (phi_k(z) - 1/k!)/z (Zhao et al. 2023, sec. 3; the phi functions
of exponential integrators, Hochbruck & Ostermann 2010).

UniPC writes every term beyond the first as one sum of scaled differences (Zhao et al. 2023, sec. 3):
x_s = (sigma_s/sigma_t) x_t + alpha_s (1 - e^{-h}) m_0 + alpha_s B(h) sum_m a_m D_m / r_m,
D_m = m_{r_m} - m_0, r_m = (lambda_m - lambda_t) / h, where a solves sum_m a_m r_m^{k-1} = h k! phi_{k+1}(-h)
/ B(h) for k = 1..K (their linear system R_p a_p = g_p / B). B(h) = h ("bh1") or 1 - e^{-h} ("bh2");
with one difference a_1 = 1/2 (their choice), which for bh2 is DPM-Solver++(2M).

UniP-p (predictor) uses the last p model outputs; UniC-p (corrector) reruns the same step with the
model output at the predicted point added (r = 1), which every multistep solver evaluates anyway: one
order more at no extra NFE (Zhao et al. 2023: UniPC-p has order p + 1). The output at the
predicted point is kept as history (their "m_t" is not re-evaluated after correcting). NFE = N.

The clean end (lambda = +inf) is reached in the VE form dx~/ds = eps instead, over the short interval
[0, s_{N-1}], with an Adams-Bashforth step through the last ``order`` eps values (:func:`clean_end_step`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.errors import UserError
from difflab.noise import NoiseSource
from difflab.samplers._common import Point, after_step, steps
from difflab.samplers.dpm_solver_pp import History
from difflab.samplers.registry import register_sampler

VARIANTS = ("bh1", "bh2")
_SERIES_BELOW = 0.5  # |h| under which phi_k(-h) is summed as a series (the recursion cancels there)


def phi(k: int, h: float) -> float:
    """phi_k(-h) = int_0^1 e^{-h (1 - v)} v^{k-1} / (k-1)! dv, for k >= 1 (Hochbruck & Ostermann 2010)."""
    if abs(h) < _SERIES_BELOW:
        return sum((-h) ** j / math.factorial(j + k) for j in range(20))
    value = -math.expm1(-h) / h
    for j in range(1, k):
        value = (value - 1.0 / math.factorial(j)) / (-h)
    return value


def _b(h: float, variant: str) -> float:
    """B(h) of Zhao et al. 2023, sec. 3.1, in the sign convention of the module docstring."""
    return h if variant == "bh1" else -math.expm1(-h)


def unified_update(x: Tensor, base: tuple[float, Tensor], others: History, cur: Point, nxt: Point, variant: str) -> Tensor:
    """x at ``nxt`` from x at ``cur`` = ``base[0]`` with model outputs ``base`` and ``others`` (module docstring).

    ``others`` are (lambda, x0) pairs: earlier points for the predictor, plus the new point for the corrector.
    """
    lam0, m0 = base
    h = nxt.lam - cur.lam
    phi1 = -math.expm1(-h)
    out = (nxt.sigma / cur.sigma) * x + nxt.alpha * phi1 * m0
    if not others:
        return out
    r = [(lam - lam0) / h for lam, _ in others]
    if len(r) == 1:
        a = [0.5]
    else:
        rows = torch.tensor([[ri ** (k - 1) for ri in r] for k in range(1, len(r) + 1)], dtype=torch.float64)
        g = torch.tensor([h * math.factorial(k) * phi(k + 1, h) for k in range(1, len(r) + 1)], dtype=torch.float64)
        a = torch.linalg.solve(rows, g / _b(h, variant)).tolist()
    corr = sum(am * (m - m0) / rm for am, rm, (_, m) in zip(a, r, others))
    return out + nxt.alpha * _b(h, variant) * corr


def clean_end_step(x: Tensor, cur: Point, eps_hist: list[tuple[float, Tensor]]) -> Tensor:
    """x at the clean end from x at ``cur``: x~(0) = x~(s) - int_0^s p(s') ds' on dx~/ds = eps, VE form.

    p is the polynomial through the (s_j, eps_j) of ``eps_hist`` (newest last), integrated exactly (an
    Adams-Bashforth step of variable size, Hairer et al. 1993, sec. III.5); one point is the Euler step.
    """
    u = torch.tensor([sj / cur.s for sj, _ in eps_hist], dtype=torch.float64)
    k = len(eps_hist)
    vander = torch.stack([u**q for q in range(k)])  # vander[q, j] = u_j^q
    moments = torch.tensor([1.0 / (q + 1) for q in range(k)], dtype=torch.float64)
    w = torch.linalg.solve(vander, moments).tolist()
    return x / cur.alpha - cur.s * sum(wj * e for wj, (_, e) in zip(w, eps_hist))


def unipc(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    order: int,
    variant: str = "bh2",
    lower_order_final: bool = True,
    corrector: bool = True,
    corrected_final: bool = True,
) -> Tensor:
    """Run UniPC-``order`` (UniP-``order`` predictor, UniC corrector) over the grid; NFE = N.

    ``lower_order_final``: step i of n uses order at most n - i, whatever n (as UniPC's reference code; the
    last steps are the longest in lambda, where extrapolating far-back outputs costs most). The step into
    the clean end (lambda = +inf) cannot be taken in lambda. With ``corrected_final`` (default) it is
    :func:`clean_end_step` from the corrected state with the eps of the last ``order`` evaluations
    (for one, x_0 = m + (x^c - x^) / alpha: the last correction is kept); without it, it returns the x0
    prediction m at the predicted state x^, as in Zhao et al.'s algorithm (the last correction is lost).

    The callback of step i (:func:`~difflab.samplers._common.after_step`) sees the predicted state x^, so
    the next model evaluation is made at what it returns; the corrector then adds its correction
    x^c - x^ (both from the step's start) to that state. Without a replacement this is UniPC unchanged.
    """
    if order not in (1, 2, 3):
        raise UserError(f"UniPC order must be 1, 2 or 3, got {order!r}")
    if variant not in VARIANTS:
        raise UserError(f"unknown UniPC variant {variant!r}; use 'bh1' (B(h) = h) or 'bh2' (B(h) = 1 - e^-h)")
    n = len(timesteps) - 1
    hist: History = []
    eps_hist: list[tuple[float, Tensor]] = []  # (s, eps) at the last ``order`` model evaluations
    last: tuple[Tensor, Point, History] | None = None  # state, point and history of the previous predictor
    predicted: Tensor | None = None  # x^ before the callback, when the callback replaced it
    for i, cur, nxt in steps(denoiser.schedule, timesteps):
        out = denoiser(x, cur.t)
        x0 = out.x0
        eps_hist = [*eps_hist, (cur.s, out.eps)][-order:]
        if corrector and last is not None:
            x_prev, prev, used = last
            x_c = unified_update(x_prev, used[-1], [*used[:-1], (cur.lam, x0)], prev, cur, variant)
            x = x_c if predicted is None else x + (x_c - predicted)  # a replaced state gets the correction x^c - x^
        hist = [*hist, (cur.lam, x0)][-order:]
        if nxt.clean:
            return after_step(denoiser, i, clean_end_step(x, cur, eps_hist) if corrected_final else x0, x0)
        k = min(order, len(hist), n - i) if lower_order_final else min(order, len(hist))
        last = (x, cur, hist[-k:])
        x_pred = unified_update(x, hist[-1], hist[-k:-1], cur, nxt, variant)
        x = after_step(denoiser, i, x_pred, x0)
        predicted = None if x is x_pred else x_pred
    return x


@register_sampler("unipc")
def unipc_sampler(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    noise: NoiseSource,
    *,
    order: int = 2,
    variant: str = "bh2",
    lower_order_final: bool = True,
) -> Tensor:
    """UniPC-``order`` (accuracy order + 1), Zhao et al. 2023, data prediction, B(h) by ``variant``; NFE = N."""
    return unipc(denoiser, x, timesteps, order, variant, lower_order_final)
