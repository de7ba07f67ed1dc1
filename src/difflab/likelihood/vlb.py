"""The DDPM variational bound: its terms (shared with the training loss) and the bound of a model.

L_vlb = L_T + sum_{t>=1} L_{t-1} + L_0 (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, eq. 4-7). In
difflab's index units (the paper's step t is our index t - 1, see :mod:`difflab.schedules`) the term of
index t is KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t >= 1 and the discretised Gaussian decoder
-log p(x_0 | x_t) at t = 0 (the step into clean data). L_T = KL(q(x_{T-1} | x_0) || N(0, I)) has no
parameters. Data convention: x = k / 127.5 - 1, bins of width 2 / (bins - 1) (Ho et al. 2020, eq. 13).
With a mask (:mod:`difflab.space`) only the real entries are summed and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from difflab.denoiser import Denoiser, DenoiserOutput
from difflab.errors import UserError
from difflab.likelihood.bits import LN2
from difflab.noise import NoiseSource
from difflab.process import Gaussian, discrete_posterior, p_reverse, q_marginal, q_sample
from difflab.schedules import NoiseSchedule
from difflab.space import Space, expand_mask


# ----- the terms -----------------------------------------------------------------------------------
def gaussian_kl(mean1: Tensor, var1: Tensor, mean2: Tensor, var2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, var1) || N(mean2, var2)) = (log(var2/var1) + (var1 + (mean1-mean2)^2)/var2 - 1) / 2."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1.0)


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, var: Tensor, bins: int = 256) -> Tensor:
    """Elementwise log P(bin of x) under N(mean, var), bins of width 2/(bins-1) on [-1, 1], outer edges at +-inf.

    (Ho et al. 2020, eq. 13.) log(Phi(b) - Phi(a)) is computed in the tail where it is accurate:
    for a bin above the mean the symmetric form Phi(-a) - Phi(-b) is used.
    """
    half, std = 1.0 / (bins - 1), var.sqrt()
    a = torch.where(x <= -1 + half / 2, -math.inf, (x - half - mean) / std)
    b = torch.where(x >= 1 - half / 2, math.inf, (x + half - mean) / std)
    flip = (a + b) > 0
    lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log(-torch.expm1(log_lo - log_hi))


def vlb_term(schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor, model: Gaussian, bins: int = 256) -> Tensor:
    """Elementwise L_t in nats: KL(q(x_{t-1}|x_t,x0) || model) where t >= 1, -log model(bin of x0) where t = 0.

    ``model`` is p(x_{t-1} | x_t) (:func:`difflab.process.p_reverse`); ``t`` integer indices, a scalar or one
    per sample. Reduce with a sum over dimensions for nats per sample, or a mean / ln 2 for bits/dim.
    """
    t = torch.as_tensor(t).long().cpu()
    first = t == 0
    if bool(first.all()):
        return -discretized_gaussian_log_likelihood(x0, model.mean, model.var, bins)
    post = discrete_posterior(schedule, x0, x_t, t)
    if not bool(first.any()):
        return gaussian_kl(post.mean, post.var, model.mean, model.var)
    at_zero = first.to(x0.device).reshape(-1, *([1] * (x0.ndim - 1)))
    safe_var = torch.where(at_zero, torch.ones_like(post.var), post.var)  # var is 0 at t = 0: keep the KL finite
    kl = gaussian_kl(post.mean, safe_var, model.mean, model.var)
    nll = -discretized_gaussian_log_likelihood(x0, model.mean, model.var, bins)
    return torch.where(at_zero, nll, kl)


def vlb_bits(
    schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor, x0_pred: Tensor, v_raw: Tensor | None,
    mask: Tensor | None = None, space: Space | None = None,
) -> Tensor:
    """Per-sample L_t in bits per real dimension of a model predicting ``x0_pred`` at x_t (the training term).

    p(x_{t-1} | x_t) has the posterior mean at ``x0_pred`` and the learned variance of ``v_raw``
    (Nichol & Dhariwal 2021, eq. 15); ``v_raw=None`` is the fixed beta-tilde variance (v_raw = -1).
    """
    v_raw = torch.full_like(x_t, -1.0) if v_raw is None else v_raw
    model = p_reverse(schedule, x_t, x0_pred, t, "learned", v_raw)
    return (space or Space()).mean(vlb_term(schedule, x0, x_t, t, model), mask) / LN2


# ----- the bound of a model ------------------------------------------------------------------------
def _check_8bit(x0: Tensor, bins: int, mask: Tensor | None) -> None:
    k = (x0 + 1.0) * ((bins - 1) / 2.0)
    bad = ((k - k.round()).abs() > 1e-3) | (k < -1e-3) | (k > bins - 1 + 1e-3)
    if mask is not None:
        bad = bad & expand_mask(mask, x0).bool()  # padding may hold anything
    if bool(bad.any()):
        raise UserError(f"vlb_bits_per_dim needs discrete data x = k / {(bins - 1) / 2:g} - 1 with k in 0..{bins - 1}; quantize x0 first")


@dataclass
class VLBResult:
    """Per-sample discrete VLB in nats and bits/dim, and its parts (all in nats, (B,))."""

    nats: Tensor
    bits_per_dim: Tensor
    prior: Tensor  # KL(q(x_{T-1} | x0) || N(0, I))
    diffusion: Tensor  # (T-1)/n * sum over the evaluated t >= 1 of KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t))
    decoder: Tensor  # -log p(x0 | x at index 0)
    timesteps: Tensor  # the indices t >= 1 evaluated
    nfe: int


def _decoder_variance(schedule: NoiseSchedule, variance: str) -> float:
    """Decoder variance at index 0: beta-tilde at index 1 for "small" (the posterior variance is 0 at index 0,
    clipped as in Ho et al.'s released code), beta at index 0 for "large" (Ho et al. 2020, sec. 3.3)."""
    ab = schedule.alphas_cumprod
    if variance == "small":
        return float(schedule.betas[1] * (1 - ab[0]) / (1 - ab[1]))
    return float(schedule.betas[0])


def _reverse_model(schedule: NoiseSchedule, x_t: Tensor, out: DenoiserOutput, t: Tensor, variance: str) -> Gaussian:
    """p(x_{t-1} | x_t): the learned variance when the denoiser has one, else the fixed ``variance``; at
    index 0 the decoder variance of :func:`_decoder_variance` (the learned one is clipped there already)."""
    if out.var_interp is not None:
        return p_reverse(schedule, x_t, out.x0, t, "learned", out.var_interp)
    model = p_reverse(schedule, x_t, out.x0, t, variance)
    if int(t) == 0:  # mean = x0_pred at index 0
        return Gaussian(model.mean, torch.full_like(model.mean, _decoder_variance(schedule, variance)))
    return model


def _subset(T: int, num_timesteps: int | None, subset_seed: int) -> Tensor:
    """The indices t >= 1 whose KL terms are evaluated: all, or ``num_timesteps`` of them at random."""
    ts = torch.arange(1, T)
    if num_timesteps is None:
        return ts
    if not isinstance(num_timesteps, int) or not 1 <= num_timesteps <= T - 1:
        raise UserError(f"num_timesteps must be an integer in 1..{T - 1}, got {num_timesteps!r}")
    return ts[torch.randperm(T - 1, generator=torch.Generator().manual_seed(subset_seed))[:num_timesteps]].sort().values


def vlb_bits_per_dim(
    denoiser: Denoiser,
    x0: Tensor,
    schedule: NoiseSchedule | None = None,
    *,
    variance: Literal["small", "large"] = "small",
    num_timesteps: int | None = None,
    subset_seed: int = 0,
    bins: int = 256,
    generator: torch.Generator | NoiseSource | None = None,
    mask: Tensor | None = None,
) -> VLBResult:
    """The DDPM bound L = L_T + sum_{t>=1} L_{t-1} + L_0 (Ho et al. 2020, eq. 5), one x_t draw per term.

    L_T = KL(q(x_{T-1}|x0) || N(0, I)); L_{t-1} = KL(q(x_{t-1}|x_t, x0) || p(x_{t-1}|x_t)) with p
    from :func:`difflab.process.p_reverse` at ``variance``; L_0 = -log p(x0 | x_0) of the discretised
    Gaussian decoder. ``num_timesteps=n`` evaluates a uniformly random subset of n of the T-1 KL terms
    (seeded by ``subset_seed``) scaled by (T-1)/n: an unbiased estimate of the sum. A denoiser that
    learns its variance (``DenoiserOutput.var_interp``, Nichol & Dhariwal 2021) uses it and ignores ``variance``.
    ``mask`` (:mod:`difflab.space`): sum and count only the real entries (bits/dim over
    ``denoiser.space.num_dims(x0, mask)``).
    """
    schedule = schedule or denoiser.schedule
    if variance not in ("small", "large"):
        raise UserError(f"unknown variance {variance!r}; use 'small' (beta-tilde) or 'large' (beta)")
    _check_8bit(x0, bins, mask)
    T, batch, space = schedule.T, x0.shape[0], denoiser.space
    ts = _subset(T, num_timesteps, subset_seed)
    noise = NoiseSource.from_any(generator, batch)
    diffusion = torch.zeros(batch, dtype=torch.float64, device=x0.device)
    for t in [*ts.tolist(), 0]:  # the KL terms, then the decoder at index 0
        x_t = q_sample(schedule, x0, torch.tensor(float(t)), noise.like(x0))
        tt = torch.tensor(t)  # one time for the whole batch: scalar coefficients
        model = _reverse_model(schedule, x_t, denoiser(x_t, float(t)), tt, variance)
        term = space.sum(vlb_term(schedule, x0, x_t, tt, model, bins), mask).to(torch.float64)
        if t == 0:
            decoder = term
        else:
            diffusion += term
    diffusion *= (T - 1) / len(ts)
    q_T = q_marginal(schedule, x0, torch.tensor(T - 1))
    prior_kl = gaussian_kl(q_T.mean, q_T.var, torch.zeros_like(q_T.mean), torch.ones_like(q_T.var))
    prior = space.sum(prior_kl, mask).to(torch.float64)
    nats = prior + diffusion + decoder
    dim = x0[0].numel() if mask is None else space.num_dims(x0, mask)
    return VLBResult(nats, nats / (dim * LN2), prior, diffusion, decoder, ts, len(ts) + 1)
