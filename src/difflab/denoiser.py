"""The denoiser contract: every model, whatever it predicts, answers (x0, eps) at (x_t, t).

Samplers, losses and guidance only talk to a :class:`Denoiser`. Wrap any network or plain callable
``model_fn(x, t, **cond) -> prediction`` with its parameterization ("eps", "x0" or "v") and its
schedule. ``t`` is the discrete index ``0 .. T-1`` as a float (fractional values allowed), passed to
``model_fn`` as a float32 tensor of shape ``(B,)`` on the model's device (float64 when ``x`` is float64); see :mod:`difflab.schedules`.
``t`` may be one time for the batch or one per sample (shape ``(B,)``); every schedule lookup broadcasts per sample.
The denoiser owns the :class:`~difflab.space.Space` its samples live in (``denoiser.space``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from difflab.errors import UserError
from difflab.process import (
    PARAMETERIZATIONS,
    network_input_scale,
    prediction_to_x0_eps,
    score_from_eps,
    split_variance_output,
    v_from_x0_eps,
)
from difflab.schedules import NoiseSchedule, broadcast_to
from difflab.space import Space

ModelFn = Callable[..., Tensor]


@dataclass
class DenoiserOutput:
    """What a denoiser answers at (x_t, t): the clean-data estimate and the noise estimate.

    ``var_interp`` is the raw variance output v_raw of a model that learns its variance (Nichol &
    Dhariwal 2021, eq. 15; :func:`difflab.process.interpolate_log_variance`), else None. Only the
    ancestral sampler and the VLB use it. ``prediction`` is the network's own output in its
    parameterization (eps, x0, v or EDM's F; the first C channels), which the training loss regresses.
    """

    x0: Tensor
    eps: Tensor
    alpha: Tensor
    sigma: Tensor
    var_interp: Tensor | None = None
    prediction: Tensor | None = None

    @property
    def score(self) -> Tensor:
        """grad_x log p_t(x) = -eps / sigma."""
        return score_from_eps(self.eps, self.sigma)

    @property
    def v(self) -> Tensor:
        """v = alpha eps - sigma x0 (Salimans & Ho 2022)."""
        return v_from_x0_eps(self.x0, self.eps, self.alpha, self.sigma)


class Denoiser:
    """Adapt ``model_fn(x, t, **cond)`` of a given parameterization to the denoiser contract.

    Counts its network evaluations in :attr:`nfe`. ``cond`` passed at construction is sent on every
    call (e.g. class labels of the batch); keyword arguments of a call are added to it. With
    ``learn_variance`` the model returns 2C channels, the prediction then v_raw
    (:func:`difflab.process.split_variance_output`), and the output carries ``var_interp``. ``space``:
    the :class:`~difflab.space.Space` of the samples (default R^D). ``check_finite=False`` lets NaN / Inf
    outputs through instead of raising (the training loss, whose NaN guard must see them).
    """

    def __init__(
        self,
        model_fn: ModelFn,
        schedule: NoiseSchedule,
        parameterization: str = "eps",
        *,
        learn_variance: bool = False,
        space: Space | None = None,
        check_finite: bool = True,
        **cond: Any,
    ) -> None:
        if parameterization not in PARAMETERIZATIONS:
            raise UserError(f"unknown parameterization {parameterization!r}; use one of {PARAMETERIZATIONS}")
        self.model_fn = model_fn
        self.schedule = schedule
        self.parameterization = parameterization
        self.learn_variance = bool(learn_variance)
        self.space = Space() if space is None else space
        self.check_finite = bool(check_finite)
        self.cond = cond
        self.nfe = 0

    def time_tensor(self, t: Tensor | float, x: Tensor) -> Tensor:
        """``t`` (a scalar or one per sample) as a float64 tensor of shape (B,) on the CPU (schedule lookups are float64)."""
        t = torch.as_tensor(t, dtype=torch.float64).detach().cpu()
        if t.ndim == 0:
            return t.expand(x.shape[0])
        if tuple(t.shape) != (x.shape[0],):
            raise UserError(f"t of shape {tuple(t.shape)} for a batch of {x.shape[0]}; pass one time or one per sample")
        return t

    def raw(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """One network evaluation, checked for shape and finiteness."""
        t_dtype = x.dtype if x.dtype == torch.float64 else torch.float32  # exact times for float64 reference models
        pred = self.model_fn(x, t.to(device=x.device, dtype=t_dtype), **{**self.cond, **cond})
        self.nfe += 1
        expected = (x.shape[0], 2 * x.shape[1], *x.shape[2:]) if self.learn_variance else tuple(x.shape)
        if not isinstance(pred, Tensor) or tuple(pred.shape) != expected:
            shape = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
            what = "twice the input's channels (learn_variance)" if self.learn_variance else "the input's shape"
            raise UserError(f"model_fn returned {shape} for input of shape {tuple(x.shape)}; it must return a tensor of {what}")
        if self.check_finite and not bool(torch.isfinite(pred).all()):
            raise UserError(f"model_fn returned NaN or Inf at t={t.flatten()[0].item():g}; check the model's weights and inputs")
        return pred

    def __call__(self, x: Tensor, t: Tensor | float, **cond: Any) -> DenoiserOutput:
        t = self.time_tensor(t, x)
        alpha = broadcast_to(self.schedule.alpha(t), x)
        sigma = broadcast_to(self.schedule.sigma(t), x)
        pred = self.raw(x * network_input_scale(self.parameterization, alpha, sigma), t, **cond)
        pred, var_interp = split_variance_output(pred, x.shape[1]) if self.learn_variance else (pred, None)
        x0, eps = prediction_to_x0_eps(pred, self.parameterization, x, alpha, sigma)
        return DenoiserOutput(x0=x0, eps=eps, alpha=alpha, sigma=sigma, var_interp=var_interp, prediction=pred)


def as_denoiser(
    model: "Denoiser | ModelFn", schedule: "NoiseSchedule | str | dict[str, Any] | None" = None,
    parameterization: str = "eps", **cond: Any
) -> Denoiser:
    """Return ``model`` if it is already a denoiser, else wrap it (a schedule is then required: a
    :class:`NoiseSchedule`, a kind name such as ``"linear"`` or a config dict, see :meth:`NoiseSchedule.coerce`)."""
    if isinstance(model, Denoiser):
        return model
    if schedule is None:
        raise UserError("a plain model_fn needs schedule=...; e.g. difflab.NoiseSchedule.linear(1000) or \"linear\"")
    return Denoiser(model, NoiseSchedule.coerce(schedule), parameterization, **cond)
