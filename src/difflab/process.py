"""The forward and reverse diffusion processes, and every conversion between eps, x0, v and score.

All formulas are for the VP process ``x_t = alpha_t x_0 + sigma_t eps`` (Ho et al. 2020) with
``alpha_t^2 + sigma_t^2 = 1``; ``alpha`` and ``sigma`` arguments broadcast against ``x``.
Discrete-step functions take integer indices ``t`` in ``0 .. T-1`` (see :mod:`difflab.schedules`).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from difflab.errors import UserError
from difflab.schedules import NoiseSchedule, broadcast_to

Parameterization = Literal["eps", "x0", "v"]
PARAMETERIZATIONS: tuple[str, ...] = ("eps", "x0", "v")


class Gaussian(NamedTuple):
    """A diagonal Gaussian given by its mean and variance (variance broadcasts against the mean)."""

    mean: Tensor
    var: Tensor


# ----- conversions: the one place ------------------------------------------------------------
def x0_from_eps(x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x0 = (x_t - sigma eps) / alpha."""
    return (x - sigma * eps) / alpha


def eps_from_x0(x: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps = (x_t - alpha x0) / sigma."""
    return (x - alpha * x0) / sigma


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """v = alpha eps - sigma x0 (Salimans & Ho 2022, sec. 4)."""
    return alpha * eps - sigma * x0


def x0_eps_from_v(x: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """x0 = alpha x_t - sigma v and eps = sigma x_t + alpha v (uses alpha^2 + sigma^2 = 1)."""
    return alpha * x - sigma * v, sigma * x + alpha * v


def score_from_eps(eps: Tensor, sigma: Tensor) -> Tensor:
    """grad_x log q_t(x) = -eps / sigma (Song et al. 2021; Vincent 2011)."""
    return -eps / sigma


def eps_from_score(score: Tensor, sigma: Tensor) -> Tensor:
    """eps = -sigma * score."""
    return -sigma * score


def prediction_to_x0_eps(
    pred: Tensor, parameterization: str, x: Tensor, alpha: Tensor, sigma: Tensor
) -> tuple[Tensor, Tensor]:
    """Turn a network output of the given parameterization into ``(x0, eps)`` at (alpha, sigma)."""
    if parameterization == "eps":
        return x0_from_eps(x, pred, alpha, sigma), pred
    if parameterization == "x0":
        return pred, eps_from_x0(x, pred, alpha, sigma)
    if parameterization == "v":
        return x0_eps_from_v(x, pred, alpha, sigma)
    raise UserError(f"unknown parameterization {parameterization!r}; use one of {PARAMETERIZATIONS}")


def target_for(parameterization: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The regression target a network of this parameterization is trained on."""
    if parameterization == "eps":
        return eps
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        return v_from_x0_eps(x0, eps, alpha, sigma)
    raise UserError(f"unknown parameterization {parameterization!r}; use one of {PARAMETERIZATIONS}")


# ----- forward process -----------------------------------------------------------------------
def _coef(values: Tensor, t: Tensor, x: Tensor) -> Tensor:
    return broadcast_to(values.to(x.device)[t.long()], x)


def q_step(schedule: NoiseSchedule, x_prev: Tensor, t: Tensor) -> Gaussian:
    """q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (Ho et al. 2020, eq. 2)."""
    return Gaussian(_coef(schedule.alphas.sqrt(), t, x_prev) * x_prev, _coef(schedule.betas, t, x_prev))


def q_marginal(schedule: NoiseSchedule, x0: Tensor, t: Tensor) -> Gaussian:
    """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (Ho et al. 2020, eq. 4)."""
    ab = schedule.alphas_cumprod
    return Gaussian(_coef(ab.sqrt(), t, x0) * x0, _coef(1 - ab, t, x0))


def q_sample(schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Draw x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps for integer or fractional t."""
    t = torch.as_tensor(t, device=x0.device)
    return broadcast_to(schedule.alpha(t.cpu()), x0) * x0 + broadcast_to(schedule.sigma(t.cpu()), x0) * noise


# ----- posterior and reverse process ----------------------------------------------------------
def posterior(
    x_t: Tensor, x0: Tensor, alpha_s: Tensor, sigma_s: Tensor, alpha_t: Tensor, sigma_t: Tensor
) -> Gaussian:
    """q(x_s | x_t, x_0) for any s < t of a VP process (Kingma et al. 2021, eq. 32-33).

    With alpha_{t|s} = alpha_t / alpha_s and sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2:
    mean = alpha_{t|s} sigma_s^2 / sigma_t^2 x_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x_0 and
    var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2. For s = t - 1 this is Ho et al. 2020, eq. 6-7.
    """
    alpha_ts = alpha_t / alpha_s
    var_ts = sigma_t**2 - alpha_ts**2 * sigma_s**2
    mean = alpha_ts * sigma_s**2 / sigma_t**2 * x_t + alpha_s * var_ts / sigma_t**2 * x0
    return Gaussian(mean, var_ts * sigma_s**2 / sigma_t**2)


def discrete_posterior(schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor) -> Gaussian:
    """q(x_{t-1} | x_t, x_0) on the discrete grid; at t = 0 the previous state is clean data (var 0)."""
    t = torch.as_tensor(t).long().cpu()
    ts, tt = (t - 1).to(torch.float64), t.to(torch.float64)
    a_s, s_s = broadcast_to(schedule.alpha(ts), x_t), broadcast_to(schedule.sigma(ts), x_t)
    a_t, s_t = broadcast_to(schedule.alpha(tt), x_t), broadcast_to(schedule.sigma(tt), x_t)
    return posterior(x_t, x0, a_s, s_s, a_t, s_t)


def p_reverse(
    schedule: NoiseSchedule,
    x_t: Tensor,
    x0_pred: Tensor,
    t: Tensor,
    variance: Literal["small", "large"] = "small",
) -> Gaussian:
    """p_theta(x_{t-1} | x_t) with fixed variance (Ho et al. 2020, sec. 3.2).

    The mean is the posterior mean with the predicted x0; the variance is beta-tilde_t
    (``"small"``, the posterior variance) or beta_t (``"large"``).
    """
    post = discrete_posterior(schedule, x0_pred, x_t, t)
    if variance == "small":
        return post
    if variance == "large":
        return Gaussian(post.mean, _coef(schedule.betas, torch.as_tensor(t), x_t))
    raise UserError(f"unknown variance {variance!r}; use 'small' (beta-tilde) or 'large' (beta)")
