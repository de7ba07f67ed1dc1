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

Parameterization = Literal["eps", "x0", "v", "edm"]
PARAMETERIZATIONS: tuple[str, ...] = ("eps", "x0", "v", "edm")
EDM_SIGMA_DATA = 0.5
"""Standard deviation of the data that EDM preconditioning assumes (Karras et al. 2022, sec. 5: images in [-1, 1])."""


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


def edm_preconditioning(
    alpha: Tensor, sigma: Tensor, sigma_data: float = EDM_SIGMA_DATA
) -> tuple[Tensor, Tensor, Tensor]:
    """EDM's (c_skip, c_out, c_in) (Karras et al. 2022, Table 1) acting on the VP state x_t, i.e.
    x0 = c_skip x_t + c_out F(c_in x_t).

    EDM writes y = x_t / alpha = x0 + s eps with s = sigma / alpha and D(y) = c_skip^E y + c_out^E F(c_in^E y),
    c_skip^E = sd^2 / (s^2 + sd^2), c_out^E = s sd / sqrt(s^2 + sd^2), c_in^E = 1 / sqrt(s^2 + sd^2).
    With r = sqrt(sigma^2 + alpha^2 sd^2) these become c_skip = alpha sd^2 / r^2, c_out = sigma sd / r and
    c_in = 1 / r on x_t. EDM's c_noise = ln(s) / 4 is replaced by the schedule's own time t, a monotone
    function of s, so every difflab network keeps its time input.
    """
    r = (sigma**2 + alpha**2 * sigma_data**2).sqrt()
    return alpha * sigma_data**2 / r**2, sigma * sigma_data / r, 1 / r


def network_input_scale(parameterization: str, alpha: Tensor, sigma: Tensor) -> Tensor | float:
    """What the network's input x_t is multiplied by: EDM's c_in for ``"edm"``, else 1."""
    return edm_preconditioning(alpha, sigma)[2] if parameterization == "edm" else 1.0


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
    if parameterization == "edm":
        c_skip, c_out, _ = edm_preconditioning(alpha, sigma)
        x0 = c_skip * x + c_out * pred
        return x0, eps_from_x0(x, x0, alpha, sigma)
    raise UserError(f"unknown parameterization {parameterization!r}; use one of {PARAMETERIZATIONS}")


def target_for(parameterization: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The regression target a network of this parameterization is trained on."""
    if parameterization == "eps":
        return eps
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        return v_from_x0_eps(x0, eps, alpha, sigma)
    if parameterization == "edm":
        return edm_target(x0, eps, alpha, sigma)
    raise UserError(f"unknown parameterization {parameterization!r}; use one of {PARAMETERIZATIONS}")


def edm_target(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, sigma_data: float = EDM_SIGMA_DATA) -> Tensor:
    """F's target (x0 - c_skip x_t) / c_out, simplified to (sigma x0 - alpha sd^2 eps) / (sd r): no division by
    c_out, which vanishes at low noise. With sd = 1 it is -v."""
    r = (sigma**2 + alpha**2 * sigma_data**2).sqrt()
    return (sigma * x0 - alpha * sigma_data**2 * eps) / (sigma_data * r)


def x0_error_per_target_error(parameterization: str, snr: Tensor) -> Tensor:
    """Factor c with ||x0 - x0_hat||^2 = c ||target - target_hat||^2 at a fixed x_t.

    From x0 = (x_t - sigma eps) / alpha and x0 = alpha x_t - sigma v: c = 1 / SNR for eps,
    1 for x0, sigma^2 = 1 / (SNR + 1) for v and c_out^2 = sd^2 / (1 + SNR sd^2) for edm. Loss weightings defined on the x0 error
    (e.g. min-SNR) use it to become weights on any parameterization's regression loss.
    """
    if parameterization == "eps":
        return 1 / snr
    if parameterization == "x0":
        return torch.ones_like(snr)
    if parameterization == "v":
        return 1 / (snr + 1)
    if parameterization == "edm":  # c_out^2 = sigma^2 sd^2 / (sigma^2 + alpha^2 sd^2)
        return EDM_SIGMA_DATA**2 / (1 + snr * EDM_SIGMA_DATA**2)
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
def transition(x_s: Tensor, alpha_s: float, sigma_s: float, alpha_t: float, sigma_t: float) -> Gaussian:
    """q(x_t | x_s) for any s < t of a VP process: N(alpha_{t|s} x_s, sigma_{t|s}^2 I) with alpha_{t|s} = alpha_t /
    alpha_s and sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2 (Kingma et al. 2021, eq. 22-23): the noise of
    many forward steps in one draw (RePaint's jumps back in time)."""
    alpha_ts = alpha_t / alpha_s
    return Gaussian(alpha_ts * x_s, sigma_t**2 - alpha_ts**2 * sigma_s**2)


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
    variance: Literal["small", "large", "learned"] = "small",
    v_raw: Tensor | None = None,
) -> Gaussian:
    """p_theta(x_{t-1} | x_t) with fixed (Ho et al. 2020, sec. 3.2) or learned variance (Nichol & Dhariwal 2021).

    The mean is the posterior mean with the predicted x0; the variance is beta-tilde_t
    (``"small"``, the posterior variance), beta_t (``"large"``) or, for ``"learned"``,
    exp(:func:`learned_log_variance`) of the network's variance output ``v_raw``.
    """
    post = discrete_posterior(schedule, x0_pred, x_t, t)
    if variance == "small":
        return post
    if variance == "large":
        return Gaussian(post.mean, _coef(schedule.betas, torch.as_tensor(t), x_t))
    if variance == "learned":
        if v_raw is None:
            raise UserError("variance='learned' needs the network's variance output v_raw; see split_variance_output")
        return Gaussian(post.mean, learned_log_variance(schedule, v_raw, t).exp())
    raise UserError(f"unknown variance {variance!r}; use 'small' (beta-tilde), 'large' (beta) or 'learned'")


# ----- learned variance (Nichol & Dhariwal 2021, sec. 3.1) ------------------------------------
def split_variance_output(output: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """Split a 2C-channel network output into (mean prediction, v_raw): the first C channels are the
    eps / x0 / v prediction, the last C the variance interpolation v_raw (Nichol & Dhariwal 2021)."""
    if output.ndim < 2 or output.shape[1] != 2 * channels:
        raise UserError(f"a learned-variance model must output 2 x {channels} = {2 * channels} channels, got shape "
                        f"{tuple(output.shape)}; build it with out_channels={2 * channels}")
    return output[:, :channels], output[:, channels:]


def interpolate_log_variance(v_raw: Tensor, log_small: Tensor | float, log_large: Tensor | float) -> Tensor:
    """log Sigma = v log beta + (1 - v) log beta-tilde with v = (v_raw + 1) / 2 (Nichol & Dhariwal 2021, eq. 15).

    ``log_small`` is log beta-tilde (the posterior variance), ``log_large`` log beta, of the step taken.
    """
    frac = (v_raw + 1) / 2
    return frac * log_large + (1 - frac) * log_small


def clipped_posterior_log_variance(schedule: NoiseSchedule) -> Tensor:
    """log beta-tilde_t = log(beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)) for t = 0 .. T-1 (float64).

    beta-tilde is 0 at index 0 (the step into clean data); it is clipped to its value at index 1, as in
    Nichol & Dhariwal's released code, so that the learned variance at t = 0 is finite.
    """
    ab = schedule.alphas_cumprod
    ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
    beta_tilde = schedule.betas * (1 - ab_prev) / (1 - ab)
    return torch.cat([beta_tilde[1:2], beta_tilde[1:]]).log()


def learned_log_variance(schedule: NoiseSchedule, v_raw: Tensor, t: Tensor) -> Tensor:
    """log Sigma_theta(x_t, t) on the training grid (Nichol & Dhariwal 2021, eq. 15), shaped like ``v_raw``.

    Interpolates between log beta_t and the clipped log beta-tilde_t (:func:`clipped_posterior_log_variance`)
    with v = (v_raw + 1) / 2; ``t`` are integer indices, a scalar or one per sample.
    """
    t = torch.as_tensor(t)
    log_small = _coef(clipped_posterior_log_variance(schedule), t, v_raw)
    log_large = _coef(schedule.betas.log(), t, v_raw)
    return interpolate_log_variance(v_raw, log_small, log_large)
