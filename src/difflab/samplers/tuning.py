"""Time grids tuned to one model: minimise the error to a tight reference solve on pilot noise.

In the spirit of Sabour et al. 2024 ("Align Your Steps"), but simpler and measured directly: for a given
model, sampler and number of steps, the grid's N - 1 interior half log-SNRs are chosen to minimise the
mean L2 distance, on a few pilot starting noises, between the sampler's clean output and a tight
reference solve of the probability-flow ODE from the same noise. The grid stays
``t_0 = t_max > t_1 > ... > t_{N-1} >= 0 > t_N = -1``, so the NFE is unchanged.

Parametrisation (every parameter vector is a valid grid): stick-breaking in lambda,
lambda_k = lambda_{k-1} + (lambda_end - lambda_{k-1}) sigmoid(theta_k), k = 1..N-1, lambda_end = lambda(t = 0),
optimised with Nelder-Mead (Nelder & Mead 1965) from the best of a few named grids.

Cost, once per model and NFE: one reference solve of the pilot batch (``reference_steps`` NFE each) plus
``max_evals`` sampler runs of ``steps`` NFE each on the pilot batch. The tuned grid is a property of
the model: evaluate it on noise other than the pilot noise.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.errors import UserError
from difflab.samplers.grids import check_grid, make_grid
from difflab.samplers.registry import SamplerFn, get_sampler, sampler_options
from difflab.schedules import CLEAN_T

START_GRIDS: tuple[tuple[str, float], ...] = (("uniform", 0.0),) + tuple(
    (kind, t_min) for kind in ("logsnr", "karras") for t_min in (0.0, 5.0, 20.0, 50.0, 100.0)
)
_EDGE = 1e-4  # fractions kept inside (0, 1) when a start grid is mapped to theta


def reference_solve(denoiser: Denoiser, x_T: Tensor, steps: int = 500, sampler: str = "unipc", **options: Any) -> Tensor:
    """A tight solve from ``x_T`` at t_max to the clean end: ``sampler`` with ``steps`` steps on the logsnr grid.

    Default UniPC-3 (order 4, third-order step into the clean end). On the 64-D mixture of bench/bench_samplers.py
    it is within 3.2e-5 (200 steps) and 8.8e-7 (500 steps) of the exact solution (mean L2).
    """
    options = {"order": 3, **options} if sampler == "unipc" else options
    grid = make_grid(denoiser.schedule, steps, "logsnr")
    return get_sampler(sampler)(denoiser, x_T.clone(), grid, None, **options)


def grid_from_theta(denoiser: Denoiser, theta: Sequence[float]) -> Tensor:
    """The grid (t_max, t_1, .., t_{N-1}, -1) of the stick-breaking parameters ``theta`` (length N - 1)."""
    sched = denoiser.schedule
    lam_lo, lam_end = (float(v) for v in sched.lambda_(torch.tensor([sched.t_max, 0.0], dtype=torch.float64)))
    lams, lam = [], lam_lo
    for th in theta:
        lam = lam + (lam_end - lam) / (1.0 + math.exp(-float(th)))
        lams.append(lam)
    t = sched.t_from_lambda(torch.tensor(lams, dtype=torch.float64)) if lams else torch.zeros(0, dtype=torch.float64)
    head = torch.tensor([sched.t_max], dtype=torch.float64)
    return torch.cat([head, t.clamp(min=0.0), torch.tensor([CLEAN_T], dtype=torch.float64)])


def theta_from_grid(denoiser: Denoiser, grid: Tensor) -> list[float]:
    """Inverse of :func:`grid_from_theta` for a grid from t_max to -1 (fractions clipped to (0, 1))."""
    sched = denoiser.schedule
    lam_end = float(sched.lambda_(0.0))
    lams = sched.lambda_(grid[:-1].clamp(min=0.0)).tolist()
    theta = []
    for prev, lam in itertools.pairwise(lams):
        f = min(max((lam - prev) / (lam_end - prev), _EDGE), 1.0 - _EDGE) if lam_end > prev else 1.0 - _EDGE
        theta.append(math.log(f / (1.0 - f)))
    return theta


def grid_error(denoiser: Denoiser, sampler: SamplerFn, grid: Tensor, x_T: Tensor, ref: Tensor, options: dict[str, Any]) -> float:
    """Mean L2 distance between the sampler's output on ``grid`` and the reference (per sample)."""
    y = sampler(denoiser, x_T.clone(), grid, None, **options)
    err = (y.double() - ref.double()).flatten(1).norm(dim=1).mean()
    return float(err) if bool(torch.isfinite(err)) else math.inf


def _start(denoiser: Denoiser, fn: SamplerFn, steps: int, x_T: Tensor, ref: Tensor, options: dict[str, Any]) -> Tensor:
    """The best of the named START_GRIDS on the pilot batch."""
    best, best_err = None, math.inf
    for kind, t_min in START_GRIDS:
        grid = make_grid(denoiser.schedule, steps, kind, t_min=t_min)
        err = grid_error(denoiser, fn, grid, x_T, ref, options)
        if err < best_err:
            best, best_err = grid, err
    return best


def _check_start(denoiser: Denoiser, start: Tensor, steps: int) -> Tensor:
    grid = check_grid(start, denoiser.schedule, what="start")
    if len(grid) != steps + 1 or grid[0] != denoiser.schedule.t_max or grid[-2] < 0:
        raise UserError(f"start must have {steps} steps from t_max = {denoiser.schedule.t_max:g}, its last noisy time >= 0,"
                        f" then -1; got {grid.tolist()}")
    return grid


def optimize_grid(
    denoiser: Denoiser,
    x_T_pilot: Tensor,
    steps: int,
    sampler: str | SamplerFn = "unipc",
    *,
    reference: Tensor | None = None,
    reference_steps: int = 500,
    max_evals: int = 600,
    start: Tensor | None = None,
    **options: Any,
) -> Tensor:
    """A grid of ``steps`` steps (t_max .. -1) that minimises ``sampler``'s error on the pilot noise.

    ``reference``: the clean end of the exact PF-ODE solution from ``x_T_pilot`` (default
    :func:`reference_solve` with ``reference_steps``). ``start``: the first grid (default the best of
    ``START_GRIDS``). ``max_evals``: Nelder-Mead budget in sampler runs. ``options`` go to the sampler.
    Returns a float64 grid for ``sample(..., timesteps=grid)``; evaluate it on other noise than the pilot.

    >>> import torch, difflab
    >>> from difflab.denoiser import Denoiser
    >>> den = Denoiser(lambda x, t: 0.1 * x, difflab.schedules.NoiseSchedule.linear(1000))
    >>> len(optimize_grid(den, torch.randn(8, 2, dtype=torch.float64), 3, reference_steps=20, max_evals=10))
    4
    """
    from scipy.optimize import minimize

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(x_T_pilot, Tensor) or x_T_pilot.ndim < 1 or x_T_pilot.shape[0] < 1:
        raise UserError("x_T_pilot must be a tensor of shape (batch, ...) with batch >= 1, e.g. torch.randn(64, 3, 32, 32)")
    fn = get_sampler(sampler)
    unknown = sorted(set(options) - set(sampler_options(fn)))
    if unknown:
        raise UserError(f"unknown option(s) {unknown} for sampler {sampler!r}; valid: {sorted(sampler_options(fn))}")
    ref = reference_solve(denoiser, x_T_pilot, reference_steps) if reference is None else reference
    if ref.shape != x_T_pilot.shape:
        raise UserError(f"reference has shape {tuple(ref.shape)}, expected {tuple(x_T_pilot.shape)} (that of x_T_pilot)")
    grid0 = _start(denoiser, fn, steps, x_T_pilot, ref, options) if start is None else _check_start(denoiser, start, steps)
    if steps == 1 or max_evals < 1:
        return grid0
    theta0 = torch.tensor(theta_from_grid(denoiser, grid0), dtype=torch.float64).numpy()

    def loss(theta) -> float:
        grid = grid_from_theta(denoiser, theta.tolist())
        if not bool((grid[1:] < grid[:-1]).all()):
            return math.inf  # two interior points merged at t = 0
        return grid_error(denoiser, fn, grid, x_T_pilot, ref, options)

    simplex = [theta0] + [theta0 + 0.5 * e for e in torch.eye(len(theta0), dtype=torch.float64).numpy()]
    settings = {"maxfev": max_evals, "initial_simplex": simplex, "fatol": 0.0, "xatol": 1e-4}
    res = minimize(loss, theta0, method="Nelder-Mead", options=settings)
    return grid_from_theta(denoiser, res.x.tolist()) if res.fun < grid_error(denoiser, fn, grid0, x_T_pilot, ref, options) else grid0
