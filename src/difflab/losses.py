"""Training objectives: L_simple and its weighted relatives, for any parameterization.

L_simple (Ho et al. 2020, eq. 14) draws t uniformly, noises x_0 with q(x_t|x_0) and regresses the
network on its target (eps, x0 or v; :func:`difflab.process.target_for`) with a per-timestep weight
w(t). With eps-prediction and w = 1 this is exactly ``E_{t, x0, eps} ||eps - eps_theta(x_t, t)||^2``.

Weightings:

- ``uniform``: w = 1 on the parameterization's own target (L_simple).
- ``min_snr``: min-SNR-gamma (Hang et al. 2023, eq. 9): the x0-space weight min(SNR_t, gamma),
  i.e. min(SNR, gamma) / SNR on the eps loss, min(SNR, gamma) on the x0 loss and
  min(SNR, gamma) / (SNR + 1) on the v loss (conversion in
  :func:`difflab.process.x0_error_per_target_error`). gamma = 5 is the paper's default.
- ``min_snr_v``: the x0-space weight min(SNR_t + 1, gamma): the uniform v loss (whose x0 weight is SNR + 1)
  capped like min-SNR, i.e. min(1, gamma / (SNR + 1)) on the v loss. It keeps the v loss's full weight at
  high noise, where the layout (position, colour) of a sample is decided and min-SNR's weight SNR / (SNR + 1)
  vanishes, and min-SNR's cap at low noise (the "SNR + 1" form diffusers' training examples use for
  v-prediction with min-SNR).

Losses (``loss=``), Nichol & Dhariwal 2021 ("Improved DDPM"); L_t is the VLB term of index t
(:func:`difflab.likelihood.vlb_term`: KL to the posterior for t >= 1, discretised decoder at t = 0) in bits/dim
(mean over real dimensions / ln 2), and T L_t is a one-sample estimate of L_vlb = sum_t L_t (the constant L_T
left out):

- ``simple``: w(t) ||target - prediction||^2 (above).
- ``vlb``: T L_t, gradients through the mean and the variance (sec. 3.3); with a fixed variance the
  model's variance is beta-tilde (v_raw = -1), clipped at t = 0.
- ``hybrid``: L_simple + lambda T L_t with lambda = 0.001 and the mean detached inside L_t, so L_simple
  alone trains the mean and L_vlb the learned variance (sec. 3.1); needs ``learn_variance``.

With ``learn_variance`` the network returns 2C channels (:func:`difflab.process.split_variance_output`).

The network is evaluated through a :class:`~difflab.denoiser.Denoiser` (its input scaling, variance split and
conversion to x0), so the loss only builds x_t, the target and the weight. Every per-sample mean is over the
sample's real dimensions: with ``mask`` (B, *prefix), 1 on real entries (:mod:`difflab.space`), it is
``sum(mask * err) / space.num_dims(x, mask)``, so padding never contributes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.errors import UserError
from difflab.likelihood.vlb import vlb_bits
from difflab.process import prediction_to_x0_eps, target_for, x0_error_per_target_error
from difflab.schedules import NoiseSchedule, broadcast_to
from difflab.space import Space

Weighting = Callable[[Tensor, str, float], Tensor]
"""``w(snr, parameterization, gamma)``: the per-sample weight on the parameterization's regression loss."""
_WEIGHTINGS: dict[str, Weighting] = {}


def register_weighting(name: str) -> Callable[[Weighting], Weighting]:
    def decorate(fn: Weighting) -> Weighting:
        _WEIGHTINGS[name] = fn
        return fn

    return decorate


@register_weighting("uniform")
def uniform_weight(snr: Tensor, parameterization: str, gamma: float) -> Tensor:
    """w(t) = 1: L_simple."""
    return torch.ones_like(snr)


@register_weighting("min_snr")
def min_snr_weight(snr: Tensor, parameterization: str, gamma: float) -> Tensor:
    """min(SNR_t, gamma) on the x0 error, expressed on the parameterization's target (Hang et al. 2023)."""
    return snr.clamp(max=gamma) * x0_error_per_target_error(parameterization, snr)


@register_weighting("min_snr_v")
def min_snr_v_weight(snr: Tensor, parameterization: str, gamma: float) -> Tensor:
    """min(SNR_t + 1, gamma) on the x0 error, expressed on the parameterization's target."""
    return (snr + 1).clamp(max=gamma) * x0_error_per_target_error(parameterization, snr)


WEIGHTINGS: tuple[str, ...] = tuple(_WEIGHTINGS)  # every registered weighting


def get_weighting(name: str) -> Weighting:
    if name not in _WEIGHTINGS:
        raise UserError(f"unknown loss weighting {name!r}; use one of {sorted(_WEIGHTINGS)}")
    return _WEIGHTINGS[name]


LOSSES: tuple[str, ...] = ("simple", "hybrid", "vlb")
HYBRID_LAMBDA = 1e-3  # lambda of L_hybrid (Nichol & Dhariwal 2021, sec. 3.1)


def check_objective(loss: str, learn_variance: bool, weighting: str = "uniform") -> None:
    """Raise a one-line UserError for a loss that cannot train this model."""
    if loss not in LOSSES:
        raise UserError(f"unknown loss {loss!r}; use one of {', '.join(LOSSES)}")
    if loss == "hybrid" and not learn_variance:
        raise UserError("loss 'hybrid' needs a learned variance; set objective.learn_variance: true (--learn-variance) or use loss simple or vlb")
    if loss == "simple" and learn_variance:
        raise UserError("loss 'simple' cannot train a learned variance; use loss hybrid or vlb, or set objective.learn_variance: false")
    if loss == "vlb" and weighting != "uniform":
        raise UserError(f"weighting {weighting!r} weighs the regression loss, which loss 'vlb' does not have; use objective.weighting: uniform")


def vlb_loss_term(
    schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor, pred: Tensor, v_raw: Tensor | None, parameterization: str,
    mask: Tensor | None = None,
) -> Tensor:
    """Per-sample L_t in bits/dim (mean over real dimensions / ln 2) of the model ``pred`` (eps / x0 / v) at x_t.

    p(x_{t-1} | x_t) has the posterior mean at the predicted x0 and the learned variance of ``v_raw``
    (Nichol & Dhariwal 2021, eq. 15); ``v_raw=None`` is the fixed beta-tilde variance (v_raw = -1).
    """
    t64 = t.to(torch.float64).cpu()
    alpha, sigma = broadcast_to(schedule.alpha(t64), x_t), broadcast_to(schedule.sigma(t64), x_t)
    x0_pred, _ = prediction_to_x0_eps(pred, parameterization, x_t, alpha, sigma)
    return vlb_bits(schedule, x0, x_t, t, x0_pred, v_raw, mask)


def diffusion_loss(
    network: Callable[..., Tensor],
    x0: Tensor,
    schedule: NoiseSchedule,
    t: Tensor,
    noise: Tensor,
    *,
    parameterization: str = "eps",
    weighting: str = "uniform",
    min_snr_gamma: float = 5.0,
    cond: dict[str, Any] | None = None,
    loss: str = "simple",
    learn_variance: bool = False,
    parts: dict[str, Tensor] | None = None,
    mask: Tensor | None = None,
    space: Space | None = None,
) -> Tensor:
    """Per-sample training loss, shape (B,): ``w(t) * mean ||target - network(x_t, t)||^2`` for ``loss="simple"``,
    T L_t for ``"vlb"``, their hybrid for ``"hybrid"`` (module docstring).

    ``t`` are integer indices (B,) and ``noise`` ~ N(0, I) like ``x0``; both are passed in so that
    the caller controls the random numbers (exact resume, distributed seeding). A dict ``parts``
    receives the detached per-sample terms: ``"simple"`` and, for vlb / hybrid, ``"vlb"`` (L_t, bits/dim).
    ``mask`` (B, *prefix): the means run over real entries only, divided by ``space.num_dims(x0, mask)``
    (``space`` default :class:`~difflab.space.Space`). NaN / Inf network outputs are not checked here: they
    reach the loss, where the trainer's NaN guard sees them.
    """
    check_objective(loss, learn_variance, weighting)
    space = space or Space()
    denoiser = Denoiser(network, schedule, parameterization, learn_variance=learn_variance, space=space, check_finite=False)
    t64 = t.to(torch.float64).cpu()
    alpha, sigma = broadcast_to(schedule.alpha(t64), x0), broadcast_to(schedule.sigma(t64), x0)
    x_t = alpha * x0 + sigma * noise
    out = denoiser(x_t, t64, **(cond or {}))
    target = target_for(parameterization, x0, noise, alpha, sigma)
    per_sample = space.mean((out.prediction.float() - target.float()).pow(2), mask)
    snr = (schedule.alpha(t64) / schedule.sigma(t64)) ** 2
    simple = get_weighting(weighting)(snr, parameterization, min_snr_gamma).to(per_sample) * per_sample
    if parts is not None:
        parts["simple"] = simple.detach()
    if loss == "simple":
        return simple
    x0_pred = out.x0.detach() if loss == "hybrid" else out.x0  # hybrid: L_vlb trains only the variance (sec. 3.1)
    v_raw = None if out.var_interp is None else out.var_interp.float()
    vlb = vlb_bits(schedule, x0.float(), x_t.float(), t, x0_pred.float(), v_raw, mask, space)
    if parts is not None:
        parts["vlb"] = vlb.detach()
    return schedule.T * vlb if loss == "vlb" else simple + HYBRID_LAMBDA * schedule.T * vlb
