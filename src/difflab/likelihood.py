"""Likelihoods of a diffusion model: exact ODE log-likelihood and the discrete variational bound.

* :func:`ode_log_likelihood`: log p(x) of the probability-flow ODE model by the instantaneous change
  of variables (Chen et al. 2018, thm. 1; Song et al. 2021, app. D.2), with an exact or a Hutchinson
  divergence (Hutchinson 1989; Grathwohl et al. 2019, FFJORD).
* :func:`vlb_bits_per_dim`: the DDPM variational bound (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021,
  sec. 2) with the discretised Gaussian decoder for 8-bit data.

Data convention (:mod:`difflab.data.images`): x = k / 127.5 - 1 for k in 0..255, so a pixel's bin has
width 1 / 127.5 and bits/dim = (-log p(x) + D log 127.5) / (D log 2). See docs/likelihood.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from difflab.denoiser import Denoiser, DenoiserOutput
from difflab.errors import UserError
from difflab.noise import NoiseSource
from difflab.process import Gaussian, p_reverse, q_marginal, q_sample
from difflab.samplers.adaptive import (
    ODESolution,
    check_tolerances,
    dopri5,
    euler_integrate,
)
from difflab.schedules import NoiseSchedule
from difflab.vlb import discretized_gaussian_log_likelihood, gaussian_kl, vlb_term  # noqa: F401 (re-exported)

PROBES = ("rademacher", "gaussian")
DIVERGENCES = ("exact", "hutchinson")
METHODS = ("rk45", "euler")
LN2 = math.log(2.0)


@dataclass
class LikelihoodResult:
    """Per-sample results: ``nats`` is the negative log-likelihood -log p(x) (B,)."""

    nats: Tensor
    bits_per_dim: Tensor
    nfe: int
    prior_log_prob: Tensor  # log p_T(x_T) at the end of the ODE
    delta_log_prob: Tensor  # integral of the divergence, log p(x) - log p_T(x_T)
    x: Tensor  # the point evaluated (after dequantization)
    x_end: Tensor  # its latent at t_end

    @property
    def log_prob(self) -> Tensor:
        return -self.nats


def standard_normal_log_prob(x: Tensor) -> Tensor:
    """log N(x; 0, I) per sample: -(|x|^2 + D log 2 pi) / 2."""
    flat = x.flatten(1)
    return -0.5 * (flat.pow(2).sum(1) + flat.shape[1] * math.log(2 * math.pi))


def bits_per_dim(nats: Tensor, dim: int, bins: int | None = 256) -> Tensor:
    """-log2 P(k) / D for data x = k / ((bins-1)/2) - 1: (nats + D log((bins-1)/2)) / (D log 2).

    A density p on R^D assigns a bin of width w = 2 / (bins - 1) per axis about p(x) w^D, hence the
    offset -D log w. ``bins=None`` gives plain continuous nats / (D log 2).
    """
    offset = 0.0 if bins is None else dim * math.log((bins - 1) / 2.0)
    return (nats + offset) / (dim * LN2)


def _divergence(eps: Tensor, x: Tensor, probes: Tensor | None) -> Tensor:
    """Per-sample div_x eps: exact (one backward pass per dimension) or Hutchinson mean over probes."""
    if probes is None:
        flat, div = eps.flatten(1), torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for i in range(flat.shape[1]):
            (grad,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)
            div = div + grad.flatten(1)[:, i]
        return div
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for v in probes:  # v^T (d eps / dx) v, with v^T J from one vector-Jacobian product
        (vjp,) = torch.autograd.grad((eps * v).sum(), x, retain_graph=True)
        total = total + (vjp * v).flatten(1).sum(1)
    return total / len(probes)


def augmented_field(denoiser: Denoiser, shape: torch.Size, probes: Tensor | None) -> Callable[[Tensor, Tensor], Tensor]:
    """d/dlambda of the state [x, l]: the PF ODE sigma^2 x - sigma eps and l' = div = D sigma^2 - sigma div eps."""
    schedule, dim = denoiser.schedule, math.prod(shape[1:])

    def field(state: Tensor, lam: Tensor) -> Tensor:
        x = state[:, :dim].reshape(shape).detach().requires_grad_(True)
        with torch.enable_grad():
            out = denoiser(x, schedule.t_from_lambda(lam))
            if not out.eps.requires_grad:
                raise UserError("the model's output does not depend differentiably on x; run it without torch.no_grad")
            div_eps = _divergence(out.eps, x, probes)
        sigma = out.sigma.detach()
        dx = sigma**2 * x.detach() - sigma * out.eps.detach()
        sigma_b = sigma.flatten(1)[:, 0] if sigma.ndim else sigma
        ddiv = dim * sigma_b**2 - sigma_b * div_eps.detach()
        return torch.cat([dx.flatten(1), ddiv[:, None]], dim=1)

    return field


def _draw_probes(kind: str, num: int, x: Tensor, noise: NoiseSource) -> Tensor:
    """``num`` probes per sample, shape (num, B, ...): Rademacher (+-1) or standard Gaussian."""
    z = torch.stack([noise.like(x) for _ in range(num)])
    return torch.sign(z) if kind == "rademacher" else z  # sign of N(0, 1) is Rademacher


def _check_ode_options(method: str, divergence: str, probe: str, num_probes: int, rtol: float, atol: float) -> None:
    for name, value, valid in (("method", method, METHODS), ("divergence", divergence, DIVERGENCES), ("probe", probe, PROBES)):
        if value not in valid:
            raise UserError(f"unknown {name} {value!r}; use one of {valid}")
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise UserError(f"num_probes must be a positive integer, got {num_probes!r}")
    check_tolerances(rtol, atol)


def dequantize(x: Tensor, noise: NoiseSource, bins: int = 256) -> Tensor:
    """x + u w with u ~ U(-1/2, 1/2) per element and w = 2 / (bins - 1) the bin width (uniform dequantization)."""
    u = torch.special.ndtr(noise.like(x)) - 0.5  # Phi(z) of z ~ N(0, 1) is U(0, 1)
    return x + u * (2.0 / (bins - 1))


def ode_log_likelihood(
    denoiser: Denoiser,
    x0: Tensor,
    *,
    method: Literal["rk45", "euler"] = "rk45",
    divergence: Literal["exact", "hutchinson"] = "exact",
    probe: Literal["rademacher", "gaussian"] = "rademacher",
    num_probes: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int = 100,
    t_start: float = 0.0,
    t_end: float | None = None,
    prior_log_prob: Callable[[Tensor], Tensor] | None = None,
    bins: int | None = 256,
    dequantize_data: bool = False,
    generator: torch.Generator | NoiseSource | None = None,
) -> LikelihoodResult:
    """log p_{t_start}(x) of the PF-ODE model: log p_{t_end}(x_{t_end}) + integral of div f along the ODE.

    The input is the state at ``t_start`` (default 0, the least noisy trained index; -1 is singular)
    and is carried forward in lambda to ``t_end`` (default t_max) with ``method`` ("rk45": adaptive
    :func:`dopri5` with rtol/atol; "euler": ``steps`` fixed steps). ``prior_log_prob`` defaults to
    N(0, I), the distribution the sampler draws x_T from, so the result is the likelihood of the
    generative model itself. ``divergence="hutchinson"`` uses ``num_probes`` fixed probes per solve.
    ``bins`` sets the bits/dim offset; ``dequantize_data`` adds uniform noise within each bin.
    ``nfe`` counts forward passes; each also costs D ("exact") or num_probes backward passes.
    """
    _check_ode_options(method, divergence, probe, num_probes, rtol, atol)
    schedule = denoiser.schedule
    t_end = schedule.t_max if t_end is None else float(t_end)
    if not -1.0 < t_start < t_end <= schedule.t_max:
        raise UserError(f"need -1 < t_start < t_end <= {schedule.t_max:g}, got t_start={t_start}, t_end={t_end}")
    noise = NoiseSource.from_any(generator, x0.shape[0])
    x = dequantize(x0, noise, bins or 256) if dequantize_data else x0
    probes = _draw_probes(probe, num_probes, x, noise) if divergence == "hutchinson" else None
    state = torch.cat([x.flatten(1), torch.zeros_like(x.flatten(1)[:, :1])], dim=1)
    field = augmented_field(denoiser, x.shape, probes)
    lam0, lam1 = schedule.lambda_(t_start), schedule.lambda_(t_end)
    if method == "rk45":
        sol: ODESolution = dopri5(field, state, lam0, lam1, rtol=rtol, atol=atol)
    else:
        sol = euler_integrate(field, state, float(lam0), float(lam1), steps)
    x_end, delta = sol.y[:, :-1].reshape(x.shape), sol.y[:, -1]
    prior = (prior_log_prob or standard_normal_log_prob)(x_end).to(delta.dtype)
    nats = -(prior + delta)
    dim = x[0].numel()
    return LikelihoodResult(nats, bits_per_dim(nats, dim, bins), sol.nfev, prior, delta, x, x_end)


# ----- discrete variational bound -------------------------------------------------------------------
def _check_8bit(x0: Tensor, bins: int) -> None:
    k = (x0 + 1.0) * ((bins - 1) / 2.0)
    if bool(((k - k.round()).abs() > 1e-3).any()) or bool(((k < -1e-3) | (k > bins - 1 + 1e-3)).any()):
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
) -> VLBResult:
    """The DDPM bound L = L_T + sum_{t>=1} L_{t-1} + L_0 (Ho et al. 2020, eq. 5), one x_t draw per term.

    L_T = KL(q(x_{T-1}|x0) || N(0, I)); L_{t-1} = KL(q(x_{t-1}|x_t, x0) || p(x_{t-1}|x_t)) with p
    from :func:`difflab.process.p_reverse` at ``variance``; L_0 = -log p(x0 | x_0) of the discretised
    Gaussian decoder. ``num_timesteps=n`` evaluates a uniformly random subset of n of the T-1 KL terms
    (seeded by ``subset_seed``) scaled by (T-1)/n: an unbiased estimate of the sum. A denoiser that
    learns its variance (``DenoiserOutput.var_interp``, Nichol & Dhariwal 2021) uses it and ignores ``variance``.
    """
    schedule = schedule or denoiser.schedule
    if variance not in ("small", "large"):
        raise UserError(f"unknown variance {variance!r}; use 'small' (beta-tilde) or 'large' (beta)")
    _check_8bit(x0, bins)
    T, batch = schedule.T, x0.shape[0]
    ts = torch.arange(1, T)
    if num_timesteps is not None:
        if not isinstance(num_timesteps, int) or not 1 <= num_timesteps <= T - 1:
            raise UserError(f"num_timesteps must be an integer in 1..{T - 1}, got {num_timesteps!r}")
        ts = ts[torch.randperm(T - 1, generator=torch.Generator().manual_seed(subset_seed))[:num_timesteps]].sort().values
    noise = NoiseSource.from_any(generator, batch)
    diffusion = torch.zeros(batch, dtype=torch.float64, device=x0.device)
    for t in [*ts.tolist(), 0]:  # the KL terms, then the decoder at index 0
        x_t = q_sample(schedule, x0, torch.tensor(float(t)), noise.like(x0))
        tt = torch.tensor(t)  # one time for the whole batch: scalar coefficients
        model = _reverse_model(schedule, x_t, denoiser(x_t, float(t)), tt, variance)
        term = vlb_term(schedule, x0, x_t, tt, model, bins).flatten(1).sum(1).to(torch.float64)
        if t == 0:
            decoder = term
        else:
            diffusion += term
    diffusion *= (T - 1) / len(ts)
    q_T = q_marginal(schedule, x0, torch.tensor(T - 1))
    prior = gaussian_kl(q_T.mean, q_T.var, torch.zeros_like(q_T.mean), torch.ones_like(q_T.var)).flatten(1).sum(1).to(torch.float64)
    nats = prior + diffusion + decoder
    dim = x0[0].numel()
    return VLBResult(nats, nats / (dim * LN2), prior, diffusion, decoder, ts, len(ts) + 1)
