"""Adaptive Runge–Kutta integration and the ``rk45`` probability-flow ODE sampler.

:func:`dopri5` is a generic integrator of ``dy/ds = f(y, s)`` on torch tensors of shape (B, ...) with
the Dormand–Prince 5(4) pair (Dormand & Prince 1980, "A family of embedded Runge–Kutta formulae",
Table 2), first-same-as-last, an embedded error estimate and a step-size controller with a safety
factor (Hairer, Nørsett & Wanner 1993, sec. II.4). Every sample of the batch carries its own
position ``s`` and step size, accepts or rejects its own steps from its own error norm, and stops at
its own end, so sample i follows exactly the path it would follow alone. All samples are evaluated
together on every call of ``f`` (a finished or rejected sample simply does not move), so ``f`` always
sees the full batch, as a conditional denoiser expects.

:func:`solve_pf_ode` integrates the probability-flow ODE of the VP SDE (Song et al. 2021, eq. 13) in
the half log-SNR ``lambda = log(alpha / sigma)``, where it reads::

    dx/dlambda = sigma^2 x - sigma eps(x, t(lambda))

(from d log alpha / d lambda = sigma^2 and d log sigma / d lambda = -alpha^2; Lu et al. 2022, eq. 3.6
in x rather than x / alpha). In lambda the field is smooth even though beta(t) of a discrete schedule
is piecewise constant in the index t, so the error control sees no kinks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.errors import UserError
from difflab.noise import NoiseSource
from difflab.samplers._common import Recording, after_step
from difflab.samplers.grids import check_grid
from difflab.samplers.registry import register_sampler
from difflab.schedules import broadcast_to

VectorField = Callable[[Tensor, Tensor], Tensor]
AcceptHook = Callable[[Tensor, Tensor], "Tensor | None"]
"""``hook(y, accepted)`` after a solver iteration in which some samples (``accepted``, (B,) bool) moved."""

# Dormand & Prince (1980): nodes c, stage matrix a, 5th-order weights b (= last row of a, FSAL),
# and e = b - b_hat, the difference to the embedded 4th-order weights.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)
_MIN_FACTOR, _MAX_FACTOR = 0.2, 10.0


@dataclass
class ODESolution:
    """End state of an integration and its cost: ``nfev`` calls of f, per-sample step counts."""

    y: Tensor
    nfev: int
    accepted: Tensor
    rejected: Tensor


def check_tolerances(rtol: float, atol: float) -> None:
    """Both tolerances must be positive finite numbers."""
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise UserError(f"{name} must be a positive number, got {value!r}; e.g. {name}=1e-5")


def _rms(v: Tensor) -> Tensor:
    """Per-sample root-mean-square over every dimension but the first, in float64 on the CPU (step control)."""
    return v.to(torch.float64).flatten(1).pow(2).mean(1).sqrt().cpu()


def _per_sample(s: Tensor | float, batch: int) -> Tensor:
    s = torch.as_tensor(s, dtype=torch.float64).detach().cpu()
    return s.expand(batch).clone() if s.ndim == 0 else s.clone()


def _initial_step(f: VectorField, y: Tensor, s: Tensor, f0: Tensor, span: Tensor, rtol: float, atol: float) -> Tensor:
    """Starting step size per sample (Hairer, Nørsett & Wanner 1993, sec. II.4); one call of f."""
    scale = atol + rtol * y.abs()
    d0, d1 = _rms(y / scale), _rms(f0 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300))
    h0 = torch.minimum(h0, span.abs())
    direction = torch.sign(span)
    f1 = f(y + broadcast_to(h0 * direction, y) * f0, s + h0 * direction)
    d2 = _rms((f1 - f0) / scale) / h0.clamp_min(1e-300)
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / dmax.clamp_min(1e-300)) ** 0.2)
    return torch.minimum(torch.minimum(100 * h0, h1), span.abs())


def _dopri_step(f: VectorField, y: Tensor, s: Tensor, h: Tensor, k1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One Dormand–Prince step of signed size h (B,): the 5th-order y_new, f(y_new) and the error."""
    hb = broadcast_to(h, y)
    ks = [k1]
    for i in range(1, 7):
        incr = sum(a * k for a, k in zip(_A[i], ks) if a != 0.0)
        y_stage = y + hb * incr
        ks.append(f(y_stage, s + _C[i] * h))
    err = hb * sum(e * k for e, k in zip(_E, ks) if e != 0.0)
    return y_stage, ks[6], err  # the last stage point is the 5th-order solution (FSAL)


def dopri5(
    f: VectorField,
    y0: Tensor,
    s0: Tensor | float,
    s1: Tensor | float,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    h_init: float | None = None,
    safety: float = 0.9,
    max_steps: int = 10_000,
    on_accept: AcceptHook | None = None,
) -> ODESolution:
    """Integrate dy/ds = f(y, s) from s0 to s1 (either direction) with Dormand–Prince 5(4).

    ``f(y, s)`` gets y of shape (B, ...) and s of shape (B,) (float64). A step of sample b is
    accepted when its error norm ``rms(err / (atol + rtol max(|y|, |y_new|))) < 1``; the next step
    is ``h * clamp(safety * norm^(-1/5), 0.2, 10)``, not above ``h`` on a rejection or on the step
    accepted right after one. For a single sample this is the controller of scipy's ``RK45``.
    ``on_accept(y, accepted)`` runs after every iteration that accepted a step of some sample; a tensor it
    returns replaces y, and f is then evaluated again at the new y (one more call of f).
    """
    check_tolerances(rtol, atol)
    if not 0 < safety <= 1:
        raise UserError(f"safety must lie in (0, 1], got {safety}; the usual value is 0.9")
    batch = y0.shape[0]
    s, s_end = _per_sample(s0, batch), _per_sample(s1, batch)
    y, direction = y0, torch.sign(s_end - s)
    done = s == s_end
    accepted, rejected = torch.zeros(batch, dtype=torch.long), torch.zeros(batch, dtype=torch.long)
    if bool(done.all()):
        return ODESolution(y, 0, accepted, rejected)
    k1, nfev = f(y, s), 1
    if h_init is None:
        h, nfev = _initial_step(f, y, s, k1, s_end - s, rtol, atol), nfev + 1
    else:
        h = torch.full((batch,), float(h_init), dtype=torch.float64)
    retry = torch.zeros(batch, dtype=torch.bool)  # the sample's last attempt was rejected
    for _ in range(max_steps):
        remaining = (s_end - s).abs()
        h_step = torch.where(done, 0.0, torch.minimum(h, remaining)) * direction
        if bool(((h_step.abs() <= 1e-14 * s.abs().clamp_min(1.0)) & ~done).any()):
            raise UserError("the adaptive step size collapsed to zero; the vector field may be non-finite or stiff")
        y_new, k_new, err = _dopri_step(f, y, s, h_step, k1)
        nfev += 6
        norm = _rms(err / (atol + rtol * torch.maximum(y.abs(), y_new.abs())))
        ok = (norm < 1.0) & ~done  # NaN norms compare False: rejected
        # the step reaches the end, up to rounding of s (a leftover of a few ulps would be a zero step)
        last = ok & (remaining - h_step.abs() <= 1e-13 * torch.maximum(s.abs(), s_end.abs()).clamp_min(1.0))
        okb = broadcast_to(ok, y).bool()
        y, k1 = torch.where(okb, y_new, y), torch.where(okb, k_new, k1)
        s = torch.where(last, s_end, torch.where(ok, s + h_step, s))
        factor = (safety * norm.clamp_min(1e-10) ** -0.2).nan_to_num(_MIN_FACTOR).clamp(_MIN_FACTOR, _MAX_FACTOR)
        factor = torch.where(ok & ~retry, factor, factor.clamp(max=1.0))  # no growth right after a rejection
        h = torch.where(done, h, h_step.abs() * factor)
        retry = ~ok & ~done
        accepted, rejected = accepted + ok.long(), rejected + retry.long()
        done = done | last
        replaced = on_accept(y, ok) if on_accept is not None and bool(ok.any()) else None
        if replaced is not None:
            y = replaced
            if not bool(done.all()):
                k1, nfev = f(y, s), nfev + 1
        if bool(done.all()):
            return ODESolution(y, nfev, accepted, rejected)
    raise UserError(f"the ODE solve did not finish in max_steps={max_steps}; loosen rtol/atol or raise max_steps")


def euler_integrate(f: VectorField, y0: Tensor, s0: float, s1: float, steps: int) -> ODESolution:
    """Fixed-step explicit Euler from s0 to s1 in ``steps`` equal steps (``steps`` calls of f)."""
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps must be a positive integer, got {steps!r}")
    batch, y = y0.shape[0], y0
    grid = torch.linspace(float(s0), float(s1), steps + 1, dtype=torch.float64)
    for s, s_next in itertools.pairwise(grid):
        y = y + float(s_next - s) * f(y, s.expand(batch))
    count = torch.full((batch,), steps, dtype=torch.long)
    return ODESolution(y, steps, count, torch.zeros_like(count))


def pf_ode_field(denoiser: Denoiser) -> VectorField:
    """The PF-ODE vector field dx/dlambda = sigma^2 x - sigma eps (see the module docstring)."""
    schedule = denoiser.schedule

    def field(x: Tensor, lam: Tensor) -> Tensor:
        out = denoiser(x, schedule.t_from_lambda(lam))
        return out.sigma**2 * x - out.sigma * out.eps

    return field


def solve_pf_ode(
    denoiser: Denoiser, x: Tensor, t_from: float, t_to: float, *, rtol: float = 1e-5, atol: float = 1e-5, **options: Any
) -> ODESolution:
    """Carry x at time ``t_from`` to ``t_to`` (index units, both > -1) along the PF ODE with :func:`dopri5`."""
    lam_from, lam_to = denoiser.schedule.lambda_(t_from), denoiser.schedule.lambda_(t_to)
    if not (bool(torch.isfinite(lam_from)) and bool(torch.isfinite(lam_to))):
        raise UserError(f"the PF ODE is integrated between noisy times > -1, got {t_from:g} -> {t_to:g}")
    return dopri5(pf_ode_field(denoiser), x, lam_from, lam_to, rtol=rtol, atol=atol, **options)


@register_sampler("rk45")
def rk45(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    noise: NoiseSource | None = None,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_end: float = 0.0,
    h_init: float | None = None,
    max_steps: int = 10_000,
) -> Tensor:
    """Probability-flow ODE with adaptive Dormand–Prince 5(4) (Song et al. 2021, sec. 4.3).

    Integrates in lambda from ``timesteps[0]`` to the small time ``t_end`` (default 0, the least noisy
    trained index) and takes the exact final step to the clean end, x0 = D(x, t_end). The solver
    picks its own steps, so the grid only supplies the start. NFE, as counted by the denoiser:
    1 (f at the start) + 1 (initial step size) + 6 per attempted step (FSAL) + 1 (final denoise),
    with attempts = max over the batch of accepted + rejected steps. ``noise`` is not used.
    The callback runs after every solver iteration that accepted a step (with the x0 estimate at each
    sample's current state) and after the final denoise; a replacement costs one more NFE.
    """
    ts = check_grid(timesteps, denoiser.schedule)
    t_start = float(ts[0])
    if not -1.0 < t_end < t_start:
        raise UserError(f"t_end must lie in (-1, {t_start:g}) (the grid's start), got {t_end!r}; the default is 0")
    recorded, hook = _accept_callback(denoiser)
    sol = solve_pf_ode(recorded, x, t_start, t_end, rtol=rtol, atol=atol, h_init=h_init, max_steps=max_steps, on_accept=hook)
    x0 = denoiser(sol.y, t_end).x0
    return after_step(denoiser, hook.steps if hook else 0, x0, x0)


class _StepHook:
    """rk45's :data:`AcceptHook`: numbers the accepted iterations and calls the sampling callback."""

    def __init__(self, denoiser: Any, recorded: Recording) -> None:
        self.denoiser, self.recorded, self.steps = denoiser, recorded, 0
        self.x0: Tensor | None = None

    def __call__(self, y: Tensor, ok: Tensor) -> Tensor | None:
        # the last evaluation of a Dormand-Prince step is at the new state (FSAL): x0 there for accepted samples
        prev = self.x0 if self.x0 is not None else self.recorded.first.x0
        self.x0 = torch.where(broadcast_to(ok, y).bool(), self.recorded.denoised, prev)
        new = after_step(self.denoiser, self.steps, y, self.x0)
        self.steps += 1
        return None if new is y else new


def _accept_callback(denoiser: Any) -> tuple[Any, _StepHook | None]:
    """The denoiser rk45 integrates with and its hook (None without a sampling callback)."""
    if getattr(denoiser, "callback", None) is None:
        return denoiser, None
    recorded = Recording(denoiser)
    return recorded, _StepHook(denoiser, recorded)
