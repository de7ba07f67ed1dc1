"""Timestep grids: ``steps + 1`` strictly decreasing times (index units) from the noisy end to ``t = -1``.

With ``N = steps``, ``T`` training steps and ``t_max = T - 1`` (see :mod:`difflab.schedules`):

* ``"uniform"``  — uniform in t: ``t_i = t_max - i (t_max + 1) / N``; fractional times allowed.
* ``"leading"``  — diffusers' DDIM "leading" spacing: ``t_i = (N - 1 - i) floor(T / N)`` for
  ``i < N``, then ``-1``; integer times, at most ``T`` steps.
* ``"trailing"`` — diffusers' "trailing" spacing (Lin et al. 2024, table 2):
  ``t_i = round(T - i T / N) - 1`` for ``i < N`` (round half to even, as numpy), then ``-1``.
* ``"quadratic"`` — denser near the data (Song et al. 2021a, app. D.2, continuous form):
  ``t_i = -1 + (t_max + 1) (1 - i / N)^2``.
* ``"logsnr"``   — uniform in lambda = log(alpha / sigma) (Lu et al. 2022, sec. 3.3) from ``t_max``
  to the last trained index ``t = 0`` (or ``t_min``) in ``N - 1`` steps, then one step ``0 -> -1`` into the clean
  end (lambda there is +inf, so the clean end cannot be on a uniform lambda grid).
* ``"karras"``   — Karras et al. 2022, eq. 5, in sigma~ = sigma / alpha with rho = 7:
  ``s_i = (s_max^(1/rho) + i / (N - 1) (s_min^(1/rho) - s_max^(1/rho)))^rho`` for ``i < N``, with
  ``s_max = s(t_max)`` and ``s_min = s(0)`` (or ``s(t_min)``), mapped back to t exactly; then ``-1`` (their sigma = 0).

For ``N = 1`` the "logsnr" and "karras" grids are ``[t_max, -1]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from difflab.errors import UserError
from difflab.schedules import CLEAN_T, NoiseSchedule

GridKind = Literal["uniform", "leading", "trailing", "quadratic", "logsnr", "karras"]
KARRAS_RHO = 7.0


def _uniform(schedule: NoiseSchedule, n: int) -> Tensor:
    i = torch.arange(n + 1, dtype=torch.float64)
    return schedule.t_max - i * (schedule.t_max + 1.0) / n


def _quadratic(schedule: NoiseSchedule, n: int) -> Tensor:
    u = 1.0 - torch.arange(n + 1, dtype=torch.float64) / n
    return CLEAN_T + (schedule.t_max + 1.0) * u**2


def _leading(schedule: NoiseSchedule, n: int) -> Tensor:
    ratio = schedule.T // n
    return torch.arange(n - 1, -1, -1, dtype=torch.float64) * ratio


def _trailing(schedule: NoiseSchedule, n: int) -> Tensor:
    i = torch.arange(n, dtype=torch.float64)
    return torch.round(schedule.T - i * schedule.T / n) - 1.0


def _lambda_range(schedule: NoiseSchedule, t_min: float) -> tuple[float, float]:
    """lambda at the noisy end t_max and at the grid's last point before the clean end, t_min."""
    lam_hi, lam_lo = schedule.lambda_(torch.tensor([schedule.t_max, t_min], dtype=torch.float64)).tolist()
    return lam_hi, lam_lo


def _logsnr(schedule: NoiseSchedule, n: int, t_min: float) -> Tensor:
    if n == 1:
        return torch.tensor([schedule.t_max], dtype=torch.float64)
    lam_hi, lam_lo = _lambda_range(schedule, t_min)
    lam = lam_hi + torch.linspace(0.0, 1.0, n, dtype=torch.float64) * (lam_lo - lam_hi)
    return _pin_ends(schedule.t_from_lambda(lam), schedule.t_max, t_min)


def _karras(schedule: NoiseSchedule, n: int, t_min: float) -> Tensor:
    if n == 1:
        return torch.tensor([schedule.t_max], dtype=torch.float64)
    lam_hi, lam_lo = _lambda_range(schedule, t_min)
    s_max, s_min = math.exp(-lam_hi), math.exp(-lam_lo)
    inv = 1.0 / KARRAS_RHO
    u = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    s = (s_max**inv + u * (s_min**inv - s_max**inv)) ** KARRAS_RHO
    return _pin_ends(schedule.t_from_lambda(-torch.log(s)), schedule.t_max, t_min)


def _pin_ends(t: Tensor, t_max: float, t_min: float) -> Tensor:
    """Set the first and last point exactly to t_max and t_min (the inverse map is exact up to rounding)."""
    t = t.clone()
    t[0], t[-1] = t_max, t_min
    return t


_GRIDS: dict[str, Callable[..., Tensor]] = {
    "uniform": _uniform,
    "leading": _leading,
    "trailing": _trailing,
    "quadratic": _quadratic,
    "logsnr": _logsnr,
    "karras": _karras,
}
_INTEGER_GRIDS = ("leading", "trailing")
_T_MIN_GRIDS = ("logsnr", "karras")
GRID_KINDS: tuple[str, ...] = tuple(_GRIDS)


def make_grid(schedule: NoiseSchedule, steps: int, kind: str = "uniform", *, t_min: float = 0.0) -> Tensor:
    """A float64 grid of ``steps + 1`` strictly decreasing times ending exactly at ``t = -1``.

    See the module docstring for each kind's formula. ``t_min`` (only "logsnr" and "karras") moves
    the last point before the clean end from t = 0 up to ``t_min``: for data without structure
    below sigma~(t_min) this spends the steps where the trajectory is decided (docs/samplers.md).
    Raises :class:`UserError` for ``steps < 1``, an unknown kind, a bad ``t_min``, or more steps than
    an integer grid ("leading", "trailing") can hold (``T``).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps must be an integer >= 1, got {steps!r}")
    if kind not in _GRIDS:
        raise UserError(f"unknown grid {kind!r}; use one of {', '.join(GRID_KINDS)}")
    if kind in _INTEGER_GRIDS and steps > schedule.T:
        raise UserError(f"the {kind!r} grid has integer times, so at most {schedule.T} steps (T); got {steps}")
    if t_min != 0.0 and kind not in _T_MIN_GRIDS:
        raise UserError(f"t_min applies to the {' and '.join(_T_MIN_GRIDS)} grids only, not {kind!r}")
    if not 0.0 <= t_min < schedule.t_max:
        raise UserError(f"t_min must lie in [0, {schedule.t_max:g}), got {t_min!r}")
    t = _GRIDS[kind](schedule, steps, t_min) if kind in _T_MIN_GRIDS else _GRIDS[kind](schedule, steps)
    if kind not in ("uniform", "quadratic"):
        t = torch.cat([t, torch.tensor([CLEAN_T], dtype=torch.float64)])
    t[-1] = CLEAN_T
    return check_grid(t, schedule, what=f"the {kind!r} grid with {steps} steps")


def check_grid(timesteps: Tensor, schedule: NoiseSchedule, what: str = "timesteps") -> Tensor:
    """Validate an explicit grid: 1-D, at least 2 points, within [-1, t_max], strictly decreasing, ending at -1."""
    t = torch.as_tensor(timesteps, dtype=torch.float64).detach().cpu()
    if t.ndim != 1 or len(t) < 2:
        raise UserError(f"{what} must be a 1-D sequence of at least 2 times, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise UserError(f"{what} contains NaN or Inf; pass finite times in [-1, {schedule.t_max:g}]")
    if t[-1].item() != CLEAN_T:
        raise UserError(f"{what} must end at the clean end t = -1, got {t[-1].item():g}; append -1")
    if t[0].item() > schedule.t_max:
        raise UserError(f"{what} starts at t = {t[0].item():g}, beyond t_max = {schedule.t_max:g}")
    diffs = t[1:] - t[:-1]
    if not bool((diffs < 0).all()):
        k = int(torch.nonzero(diffs >= 0)[0])
        raise UserError(
            f"{what} must strictly decrease, but t[{k}] = {t[k].item():g} and t[{k + 1}] = {t[k + 1].item():g};"
            " use fewer steps or another grid"
        )
    return t
