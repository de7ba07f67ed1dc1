"""Exact log-likelihood of the probability-flow ODE model by the instantaneous change of variables.

d/dlambda [x, l] = [f, div f] with f = sigma^2 x - sigma eps the PF ODE in the half log-SNR lambda
(:mod:`difflab.samplers.adaptive`), so log p_{t_start}(x) = log p_{t_end}(x_{t_end}) + l(t_end)
(Chen et al. 2018, thm. 1; Song et al. 2021, app. D.2). The divergence is exact (one backward pass per
dimension) or Hutchinson's estimate (Hutchinson 1989; Grathwohl et al. 2019, FFJORD). With a mask the
padded entries are frozen and left out of the divergence, the prior and D. See docs/likelihood.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.errors import UserError
from difflab.likelihood.bits import bits_per_dim, standard_normal_log_prob
from difflab.noise import NoiseSource
from difflab.samplers.adaptive import ODESolution, check_tolerances, dopri5, euler_integrate
from difflab.space import expand_mask

PROBES = ("rademacher", "gaussian")
DIVERGENCES = ("exact", "hutchinson")
METHODS = ("rk45", "euler")


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


def _divergence(eps: Tensor, x: Tensor, probes: Tensor | None, keep: Tensor | None) -> Tensor:
    """Per-sample div_x eps over the kept entries: exact (one backward pass per dimension) or the
    Hutchinson mean over probes (which are zero on padding)."""
    if probes is None:
        flat, div = eps.flatten(1), torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        kept = None if keep is None else keep.expand_as(x).flatten(1)
        for i in range(flat.shape[1]):
            (grad,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)
            diag = grad.flatten(1)[:, i]
            div = div + (diag if kept is None else diag * kept[:, i])
        return div
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for v in probes:  # v^T (d eps / dx) v, with v^T J from one vector-Jacobian product
        (vjp,) = torch.autograd.grad((eps * v).sum(), x, retain_graph=True)
        total = total + (vjp * v).flatten(1).sum(1)
    return total / len(probes)


def augmented_field(
    denoiser: Denoiser, shape: torch.Size, probes: Tensor | None, mask: Tensor | None = None
) -> Callable[[Tensor, Tensor], Tensor]:
    """d/dlambda of the state [x, l]: the PF ODE sigma^2 x - sigma eps and l' = div = D sigma^2 - sigma div eps.

    With ``mask`` (:mod:`difflab.space`) the padded entries do not move and D counts the real ones.
    """
    schedule, size = denoiser.schedule, int(torch.Size(shape[1:]).numel())
    dims = None if mask is None else denoiser.space.num_dims(torch.empty(shape), mask)

    def field(state: Tensor, lam: Tensor) -> Tensor:
        x = state[:, :size].reshape(shape).detach().requires_grad_(True)
        keep = None if mask is None else expand_mask(mask, x)
        with torch.enable_grad():
            out = denoiser(x, schedule.t_from_lambda(lam))
            if not out.eps.requires_grad:
                raise UserError("the model's output does not depend differentiably on x; run it without torch.no_grad")
            div_eps = _divergence(out.eps, x, probes, keep)
        sigma = out.sigma.detach()
        dx = sigma**2 * x.detach() - sigma * out.eps.detach()
        dx = dx if keep is None else dx * keep
        sigma_b = sigma.flatten(1)[:, 0] if sigma.ndim else sigma
        dim = size if dims is None else dims.to(device=sigma_b.device, dtype=sigma_b.dtype)
        ddiv = dim * sigma_b**2 - sigma_b * div_eps.detach()
        return torch.cat([dx.flatten(1), ddiv[:, None]], dim=1)

    return field


def _draw_probes(kind: str, num: int, x: Tensor, noise: NoiseSource, mask: Tensor | None) -> Tensor:
    """``num`` probes per sample, shape (num, B, ...): Rademacher (+-1) or standard Gaussian, 0 on padding."""
    z = torch.stack([noise.like(x) for _ in range(num)])
    probes = torch.sign(z) if kind == "rademacher" else z  # sign of N(0, 1) is Rademacher
    return probes if mask is None else probes * expand_mask(mask, x)


def _check_ode_options(method: str, divergence: str, probe: str, num_probes: int, rtol: float, atol: float) -> None:
    for name, value, valid in (("method", method, METHODS), ("divergence", divergence, DIVERGENCES), ("probe", probe, PROBES)):
        if value not in valid:
            raise UserError(f"unknown {name} {value!r}; use one of {valid}")
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise UserError(f"num_probes must be a positive integer, got {num_probes!r}")
    check_tolerances(rtol, atol)


def dequantize(x: Tensor, noise: NoiseSource, bins: int = 256, mask: Tensor | None = None) -> Tensor:
    """x + u w with u ~ U(-1/2, 1/2) per real element and w = 2 / (bins - 1) the bin width (uniform dequantization)."""
    u = torch.special.ndtr(noise.like(x)) - 0.5  # Phi(z) of z ~ N(0, 1) is U(0, 1)
    u = u if mask is None else u * expand_mask(mask, x)
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
    prior_log_prob: Callable[..., Tensor] | None = None,
    bins: int | None = 256,
    dequantize_data: bool = False,
    generator: torch.Generator | NoiseSource | None = None,
    mask: Tensor | None = None,
) -> LikelihoodResult:
    """log p_{t_start}(x) of the PF-ODE model: log p_{t_end}(x_{t_end}) + integral of div f along the ODE.

    The input is the state at ``t_start`` (default 0, the least noisy trained index; -1 is singular)
    and is carried forward in lambda to ``t_end`` (default t_max) with ``method`` ("rk45": adaptive
    :func:`dopri5` with rtol/atol; "euler": ``steps`` fixed steps). ``prior_log_prob`` defaults to
    N(0, I), the distribution the sampler draws x_T from, so the result is the likelihood of the
    generative model itself. ``divergence="hutchinson"`` uses ``num_probes`` fixed probes per solve.
    ``bins`` sets the bits/dim offset; ``dequantize_data`` adds uniform noise within each bin.
    ``mask`` (B, *prefix), 1 on real entries (:mod:`difflab.space`): the likelihood of the real entries
    only, bits/dim over ``denoiser.space.num_dims(x0, mask)``; a custom prior is then called as
    ``prior_log_prob(x_end, mask)``. ``nfe`` counts forward passes; each also costs D ("exact") or
    num_probes backward passes.
    """
    _check_ode_options(method, divergence, probe, num_probes, rtol, atol)
    schedule = denoiser.schedule
    t_end = schedule.t_max if t_end is None else float(t_end)
    if not -1.0 < t_start < t_end <= schedule.t_max:
        raise UserError(f"need -1 < t_start < t_end <= {schedule.t_max:g}, got t_start={t_start}, t_end={t_end}")
    noise = NoiseSource.from_any(generator, x0.shape[0])
    x = dequantize(x0, noise, bins or 256, mask) if dequantize_data else x0
    probes = _draw_probes(probe, num_probes, x, noise, mask) if divergence == "hutchinson" else None
    state = torch.cat([x.flatten(1), torch.zeros_like(x.flatten(1)[:, :1])], dim=1)
    field = augmented_field(denoiser, x.shape, probes, mask)
    lam0, lam1 = schedule.lambda_(t_start), schedule.lambda_(t_end)
    if method == "rk45":
        sol: ODESolution = dopri5(field, state, lam0, lam1, rtol=rtol, atol=atol)
    else:
        sol = euler_integrate(field, state, float(lam0), float(lam1), steps)
    x_end, delta = sol.y[:, :-1].reshape(x.shape), sol.y[:, -1]
    if mask is None:
        prior = (prior_log_prob or standard_normal_log_prob)(x_end).to(delta.dtype)
        dim: int | Tensor = x[0].numel()
    else:
        prior_fn = prior_log_prob or (lambda y, m: standard_normal_log_prob(y, m, denoiser.space))
        prior = prior_fn(x_end, mask).to(delta.dtype)
        dim = denoiser.space.num_dims(x, mask)
    nats = -(prior + delta)
    return LikelihoodResult(nats, bits_per_dim(nats, dim, bins), sol.nfev, prior, delta, x, x_end)
