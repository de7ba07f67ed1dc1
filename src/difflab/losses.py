"""Training objectives: L_simple and its weighted relatives, for any parameterization.

L_simple (Ho et al. 2020, eq. 14) draws t uniformly, noises x_0 with q(x_t|x_0) and regresses the
network on its target (eps, x0 or v; :func:`difflab.process.target_for`) with a per-timestep weight
w(t). With eps-prediction and w = 1 this is exactly ``E_{t, x0, eps} ||eps - eps_theta(x_t, t)||^2``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from difflab.errors import UserError
from difflab.process import target_for
from difflab.schedules import NoiseSchedule, broadcast_to

Weighting = Callable[[Tensor, str], Tensor]
_WEIGHTINGS: dict[str, Weighting] = {}


def register_weighting(name: str) -> Callable[[Weighting], Weighting]:
    def decorate(fn: Weighting) -> Weighting:
        _WEIGHTINGS[name] = fn
        return fn

    return decorate


@register_weighting("uniform")
def uniform_weight(snr: Tensor, parameterization: str) -> Tensor:
    """w(t) = 1: L_simple."""
    return torch.ones_like(snr)


def get_weighting(name: str) -> Weighting:
    if name not in _WEIGHTINGS:
        raise UserError(f"unknown loss weighting {name!r}; use one of {sorted(_WEIGHTINGS)}")
    return _WEIGHTINGS[name]


def diffusion_loss(
    network: Callable[..., Tensor],
    x0: Tensor,
    schedule: NoiseSchedule,
    t: Tensor,
    noise: Tensor,
    *,
    parameterization: str = "eps",
    weighting: str = "uniform",
    cond: dict[str, Any] | None = None,
) -> Tensor:
    """Per-sample weighted regression loss ``w(t) * mean ||target - network(x_t, t)||^2``, shape (B,).

    ``t`` are integer indices (B,) and ``noise`` ~ N(0, I) like ``x0``; both are passed in so that
    the caller controls the random numbers (exact resume, distributed seeding).
    """
    t64 = t.to(torch.float64).cpu()
    alpha, sigma = broadcast_to(schedule.alpha(t64), x0), broadcast_to(schedule.sigma(t64), x0)
    x_t = alpha * x0 + sigma * noise
    pred = network(x_t, t.to(device=x0.device, dtype=torch.float32), **(cond or {}))
    target = target_for(parameterization, x0, noise, alpha, sigma)
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    snr = (schedule.alpha(t64) / schedule.sigma(t64)) ** 2
    return get_weighting(weighting)(snr, parameterization).to(per_sample) * per_sample
