"""Noise schedules: the one place where beta, alpha-bar, sigma and log-SNR are defined.

Conventions (used everywhere in difflab):

* The forward process is variance preserving (VP): ``x_t = alpha(t) x_0 + sigma(t) eps`` with
  ``alpha(t)^2 + sigma(t)^2 = 1`` and ``alpha(t)^2 = alpha_bar(t)`` (Ho et al. 2020, eq. 4).
* Time is measured in the **discrete index** ``t = 0 .. T-1`` as a float (fractional values
  allowed), the unit diffusers' UNets expect. The DDPM paper numbers steps ``1 .. T``; our index is
  ``t_paper - 1``. Clean data, ``x_0`` in the paper, is therefore ``t = -1`` where ``alpha_bar = 1``
  and ``sigma = 0``. Every sampler ends its time grid there.
* Between integer indices the continuous-time view interpolates ``log alpha_bar`` linearly in
  ``t`` (as DPM-Solver does for discrete-time models, Lu et al. 2022, sec. 3.4 / app. D).
* ``lambda(t) = log(alpha(t) / sigma(t))`` is half the log signal-to-noise ratio (Lu et al. 2022;
  Kingma et al. 2021 use ``log SNR = 2 lambda``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from difflab.errors import UserError

ScheduleKind = Literal["linear", "cosine", "quadratic", "scaled_linear"]
CLEAN_T = -1.0  # time index of clean data (alpha_bar = 1, sigma = 0)


def linear_betas(T: int, beta_min: float = 1e-4, beta_max: float = 0.02) -> Tensor:
    """beta_t = beta_min + (t-1)/(T-1) (beta_max - beta_min), t = 1..T (Ho et al. 2020, sec. 4)."""
    t = torch.arange(1, T + 1, dtype=torch.float64)
    return beta_min + (t - 1) / (T - 1) * (beta_max - beta_min)


def quadratic_betas(T: int, beta_min: float = 1e-4, beta_max: float = 0.02) -> Tensor:
    """beta_t = (sqrt(beta_min) + (t-1)/(T-1) (sqrt(beta_max) - sqrt(beta_min)))^2, t = 1..T."""
    t = torch.arange(1, T + 1, dtype=torch.float64)
    root = math.sqrt(beta_min) + (t - 1) / (T - 1) * (math.sqrt(beta_max) - math.sqrt(beta_min))
    return root**2


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17).

    alpha_bar_t = f(t/T) / f(0) with f(u) = cos(((u + s) / (1 + s)) pi/2)^2, and
    beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} clipped at ``max_beta``.
    """
    u = torch.arange(0, T + 1, dtype=torch.float64) / T
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def scaled_linear_betas(T: int, beta_min: float = 0.00085, beta_max: float = 0.012) -> Tensor:
    """Stable Diffusion's "scaled_linear" betas: beta = linspace(sqrt(beta_min), sqrt(beta_max), T)^2.

    The schedule of latent diffusion (Rombach et al. 2022; the ``beta_schedule: scaled_linear``,
    ``linear_start 0.00085`` / ``linear_end 0.012`` of the Stable Diffusion configs). It is
    :func:`quadratic_betas` with those defaults.
    """
    return quadratic_betas(T, beta_min, beta_max)


_BETA_FUNCTIONS = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "quadratic": quadratic_betas,
    "scaled_linear": scaled_linear_betas,
}


class NoiseSchedule:
    """A discrete VP schedule of ``T`` steps with its continuous-time view.

    Build one with :meth:`linear`, :meth:`cosine`, :meth:`quadratic`, :meth:`scaled_linear` or
    :meth:`from_config`.
    Discrete quantities are float64 tensors indexed ``0 .. T-1``; the continuous methods take
    ``t`` as a float or tensor in ``[-1, T-1]`` (see the module docstring for the unit).
    """

    def __init__(self, betas: Tensor, config: dict[str, Any] | None = None) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise UserError(f"a schedule needs a 1-D tensor of at least 2 betas, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise UserError("every beta must lie in (0, 1); check beta_min and beta_max")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.config = dict(config or {"kind": "custom", "num_timesteps": len(betas)})
        # log alpha_bar at the knots t = -1, 0, ..., T-1 (the knot at -1 is clean data).
        self._log_ab_knots = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(self.alphas_cumprod)])

    # ----- construction -------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "NoiseSchedule":
        """Build from ``{"kind": "linear"|"cosine"|"quadratic"|"scaled_linear", "num_timesteps": T, ...}``."""
        config = dict(config)
        kind = config.pop("kind", "linear")
        if kind not in _BETA_FUNCTIONS:
            raise UserError(f"unknown schedule kind {kind!r}; use one of {sorted(_BETA_FUNCTIONS)}")
        T = int(config.pop("num_timesteps", 1000))
        if T < 2:
            raise UserError(f"num_timesteps must be at least 2, got {T}")
        try:
            betas = _BETA_FUNCTIONS[kind](T, **config)
        except TypeError as err:
            raise UserError(f"bad option for the {kind} schedule: {err}") from None
        return cls(betas, {"kind": kind, "num_timesteps": T, **config})

    @classmethod
    def coerce(cls, spec: "NoiseSchedule | str | dict[str, Any]") -> "NoiseSchedule":
        """A schedule from itself, a kind name (``"linear"``: that kind with T = 1000) or a config dict.

        >>> NoiseSchedule.coerce("cosine").T, NoiseSchedule.coerce({"kind": "linear", "num_timesteps": 50}).T
        (1000, 50)
        """
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, str):
            spec = {"kind": spec}
        if not isinstance(spec, dict):
            raise UserError(f"schedule must be a NoiseSchedule, a kind name or a config dict, got {type(spec).__name__} "
                            f"{spec!r:.40}; e.g. schedule=\"linear\" or {{\"kind\": \"cosine\", \"num_timesteps\": 1000}}; "
                            f"kinds: {', '.join(sorted(_BETA_FUNCTIONS))}")
        return cls.from_config(spec)

    @classmethod
    def linear(cls, T: int = 1000, beta_min: float = 1e-4, beta_max: float = 0.02) -> "NoiseSchedule":
        return cls.from_config({"kind": "linear", "num_timesteps": T, "beta_min": beta_min, "beta_max": beta_max})

    @classmethod
    def quadratic(cls, T: int = 1000, beta_min: float = 1e-4, beta_max: float = 0.02) -> "NoiseSchedule":
        return cls.from_config({"kind": "quadratic", "num_timesteps": T, "beta_min": beta_min, "beta_max": beta_max})

    @classmethod
    def scaled_linear(cls, T: int = 1000, beta_min: float = 0.00085, beta_max: float = 0.012) -> "NoiseSchedule":
        """Stable Diffusion's schedule (:func:`scaled_linear_betas`)."""
        return cls.from_config({"kind": "scaled_linear", "num_timesteps": T, "beta_min": beta_min, "beta_max": beta_max})

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        return cls.from_config({"kind": "cosine", "num_timesteps": T, "s": s, "max_beta": max_beta})

    def to_config(self) -> dict[str, Any]:
        return dict(self.config)

    @property
    def T(self) -> int:
        return len(self.betas)

    @property
    def t_max(self) -> float:
        """The noisiest time index, ``T - 1``."""
        return float(self.T - 1)

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.config})"

    # ----- continuous-time view -------------------------------------------------------------
    def _knot_position(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Segment index into the knots and the fraction inside it, for t in [-1, T-1]."""
        pos = (t.to(torch.float64) + 1.0).clamp(0.0, float(self.T))
        idx = pos.floor().clamp(max=self.T - 1).long()
        return idx, pos - idx

    def log_alpha_bar(self, t: Tensor | float) -> Tensor:
        """log alpha_bar(t), piecewise linear in t between the integer indices (and 0 at t = -1)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if bool(((t < -1 - 1e-9) | (t > self.t_max + 1e-9)).any()):
            raise UserError(f"time must lie in [-1, {self.t_max:g}] (index units), got {t.min().item():g}..{t.max().item():g}")
        idx, frac = self._knot_position(t)
        knots = self._log_ab_knots
        return knots[idx] + frac * (knots[(idx + 1).clamp(max=self.T)] - knots[idx])

    def alpha(self, t: Tensor | float) -> Tensor:
        """Signal scale alpha(t) = sqrt(alpha_bar(t))."""
        return torch.exp(0.5 * self.log_alpha_bar(t))

    def sigma(self, t: Tensor | float) -> Tensor:
        """Noise scale sigma(t) = sqrt(1 - alpha_bar(t)), computed with expm1 for accuracy near t = -1."""
        return torch.sqrt(-torch.expm1(self.log_alpha_bar(t)))

    def lambda_(self, t: Tensor | float) -> Tensor:
        """Half log-SNR lambda(t) = log(alpha / sigma); +inf at the clean end t = -1."""
        log_ab = self.log_alpha_bar(t)
        return 0.5 * (log_ab - torch.log(-torch.expm1(log_ab)))

    def t_from_lambda(self, lam: Tensor | float) -> Tensor:
        """Inverse of :meth:`lambda_` (exact for the piecewise-linear log alpha_bar)."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        log_ab = -torch.nn.functional.softplus(-2.0 * lam)  # alpha_bar = sigmoid(2 lambda)
        knots = self._log_ab_knots  # decreasing in t
        # searchsorted needs increasing values: search on the negated knots.
        seg = torch.searchsorted(-knots, -log_ab.contiguous(), right=False).clamp(1, self.T) - 1
        lo, hi = knots[seg], knots[seg + 1]
        frac = ((log_ab - lo) / (hi - lo)).clamp(0.0, 1.0)
        return seg.to(torch.float64) - 1.0 + frac

    def beta(self, t: Tensor | float) -> Tensor:
        """VP-SDE rate beta(t) = -d log alpha_bar / dt (Song et al. 2021, eq. 11), per index unit.

        The drift of the forward SDE is f(t) = -beta(t)/2 and the squared diffusion g(t)^2 = beta(t).
        For the interpolated discrete schedule it is piecewise constant, -log(1 - beta_i) on the
        segment ending at index i.
        """
        t = torch.as_tensor(t, dtype=torch.float64)
        idx, _ = self._knot_position(t)
        knots = self._log_ab_knots
        return -(knots[(idx + 1).clamp(max=self.T)] - knots[idx])


def broadcast_to(coef: Tensor, x: Tensor) -> Tensor:
    """Shape a per-sample coefficient (scalar or (B,)) to broadcast against ``x`` of shape (B, ...)."""
    coef = coef.to(device=x.device, dtype=x.dtype)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape[0], *([1] * (x.ndim - 1)))
