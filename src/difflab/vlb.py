"""The terms of the DDPM variational bound, shared by the training loss and the likelihood evaluation.

L_vlb = L_T + sum_{t>=1} L_{t-1} + L_0 (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, eq. 4-7). In
difflab's index units (the paper's step t is our index t - 1, see :mod:`difflab.schedules`) the term of
index t is KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t >= 1 and the discretised Gaussian decoder
-log p(x_0 | x_t) at t = 0 (the step into clean data). L_T = KL(q(x_{T-1} | x_0) || N(0, I)) has no
parameters. Data convention: x = k / 127.5 - 1, bins of width 2 / (bins - 1) (Ho et al. 2020, eq. 13).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.process import Gaussian, discrete_posterior
from difflab.schedules import NoiseSchedule


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
