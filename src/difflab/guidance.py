"""Guidance as denoiser wrappers: each takes a :class:`Denoiser` and is one, so every sampler works with it.

* :class:`CFGDenoiser`: classifier-free guidance (Ho & Salimans 2022),
  ``eps = eps_u + w (eps_c - eps_u)``, both branches in one batched network call; optional guidance
  rescale (Lin et al. 2023) and guidance interval (Kynkäänniemi et al. 2024).
* :class:`ClassifierGuidedDenoiser`: classifier guidance (Dhariwal & Nichol 2021, Alg. 2),
  ``eps_hat = eps - s sigma_t grad_x log p_phi(y | x_t, t)``; :func:`mean_shift` is their Alg. 1 step.

Guidance acts on ``eps`` and ``x0`` is recomputed with :func:`difflab.process.x0_from_eps`: at fixed t
the maps between eps, x0 and v are affine, ``x0 = (x_t - sigma eps) / alpha``, and the guidance weights
sum to one, so guiding eps, x0 or v gives the same result; eps is the space the papers write it in.
NFE counts network calls: a guided evaluation is one call on a doubled batch, so a guided sampler
reports the same NFE as the unguided one while each call costs about twice the compute.

>>> import torch, difflab
>>> from difflab.denoiser import Denoiser
>>> sched = difflab.schedules.NoiseSchedule.linear(1000)
>>> net = lambda x, t, class_labels: x * 0.1 * (1 + class_labels.reshape(-1, 1))
>>> cfg = CFGDenoiser(Denoiser(net, sched), {"class_labels": 3}, {"class_labels": 10}, guidance_scale=4.0)
>>> out = difflab.samplers.sample(cfg, torch.randn(2, 5), "ddim", steps=4)
>>> out.nfe, cfg.nfe
(4, 4)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from difflab.conditioning import check_labels, expand_conditions, pair_conditions, repeat_conditions
from difflab.denoiser import Denoiser, DenoiserOutput
from difflab.errors import UserError
from difflab.process import prediction_to_x0_eps, target_for, x0_from_eps
from difflab.schedules import NoiseSchedule
from difflab.space import Space as SampleSpace

Space = Literal["x0", "eps", "v"]
IntervalUnit = Literal["t", "sigma"]
Classifier = Callable[[Tensor, Tensor], Tensor]


def _check_scale(name: str, value: float, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UserError(f"{name} must be a finite number >= 0, got {value!r}; {hint}")
    return float(value)


class GuidedDenoiser(Denoiser):
    """A denoiser built on another one: it shares the inner denoiser's schedule, space, model and NFE counter."""

    def __init__(self, denoiser: Denoiser) -> None:
        # Denoiser.__init__ is not called: the model, schedule, space and NFE counter live in the inner denoiser.
        if not isinstance(denoiser, Denoiser):
            raise UserError(f"guidance wraps a Denoiser, got {type(denoiser).__name__}; use Denoiser(model_fn, schedule)")
        self.denoiser = denoiser

    @property
    def schedule(self) -> NoiseSchedule:  # type: ignore[override]
        return self.denoiser.schedule

    @property
    def space(self) -> SampleSpace:  # type: ignore[override]
        return self.denoiser.space

    @property
    def parameterization(self) -> str:  # type: ignore[override]
        return self.denoiser.parameterization

    @property
    def model_fn(self) -> Any:  # type: ignore[override]
        return self.denoiser.model_fn

    @property
    def cond(self) -> dict[str, Any]:  # type: ignore[override]
        return self.denoiser.cond

    @property
    def nfe(self) -> int:  # type: ignore[override]
        """Network calls of the innermost model (a batched guided call counts once)."""
        return self.denoiser.nfe

    @nfe.setter
    def nfe(self, value: int) -> None:
        self.denoiser.nfe = value

    def raw(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """One unguided network evaluation of the inner denoiser."""
        return self.denoiser.raw(x, t, **cond)


# ----- classifier-free guidance --------------------------------------------------------------
def rescale_guidance(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.4).

    ``x_rescaled = x_cfg * std(x_pos) / std(x_cfg)`` per sample, ``x_final = phi x_rescaled + (1 - phi) x_cfg``.
    """
    dims = tuple(range(1, guided.ndim))
    factor = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return guided * (phi * factor + (1.0 - phi))


def _on(cond: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in cond.items()}


def noise_level(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """The VE / EDM noise level sigma_t / alpha_t = exp(-lambda_t) at index time ``t`` (Karras et al. 2022)."""
    return schedule.sigma(t) / schedule.alpha(t)


class CFGDenoiser(GuidedDenoiser):
    """Classifier-free guidance, ``eps = eps_u + w (eps_c - eps_u)`` (Ho & Salimans 2022, eq. 6).

    ``cond`` / ``uncond`` map condition names to tensors, e.g. ``{"class_labels": y}`` and
    ``{"class_labels": null_label}``, or ``{"context": emb}`` and ``{"context": empty_prompt_emb}``;
    a scalar or a batch-1 value is repeated for the batch. A negative prompt is ``uncond`` set to its
    embedding. ``uncond=None`` uses the model's ``null_label`` for class labels and zeros for the other
    conditions (what :func:`difflab.conditioning.drop_context` trains by default). ``w = 0`` is the
    unconditional model, ``w = 1`` the conditional one (then only the conditional branch is run).

    ``rescale`` = phi in [0, 1] applies :func:`rescale_guidance` to the ``rescale_space`` prediction
    (default x0, whose inflated std is the over-exposure Lin et al. correct; "v" matches their
    v-prediction model's output). ``interval=(lo, hi)`` guides only where ``lo <= t <= hi`` (index
    units) or ``lo <= sigma_t / alpha_t <= hi`` (``interval_unit="sigma"``, EDM noise level, the unit of
    Kynkäänniemi et al. 2024); elsewhere the conditional model is used alone, in one call on the plain batch.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        cond: Mapping[str, Any],
        uncond: Mapping[str, Any] | None = None,
        guidance_scale: float = 1.0,
        *,
        rescale: float = 0.0,
        rescale_space: Space = "x0",
        interval: tuple[float, float] | None = None,
        interval_unit: IntervalUnit = "t",
        num_classes: int | None = None,
    ) -> None:
        super().__init__(denoiser)
        self.guidance_scale = _check_scale("guidance_scale", guidance_scale, "use 0 (unconditional), 1 (conditional) or more")
        self.rescale = _check_scale("rescale", rescale, "use phi in [0, 1], e.g. 0.7 (Lin et al. 2023)")
        if self.rescale > 1.0:
            raise UserError(f"rescale must lie in [0, 1], got {rescale!r}; e.g. 0.7 (Lin et al. 2023)")
        if rescale_space not in ("x0", "eps", "v"):
            raise UserError(f"rescale_space must be 'x0', 'eps' or 'v', got {rescale_space!r}")
        self.rescale_space = rescale_space
        self.interval, self.interval_unit = self._check_interval(interval, interval_unit)
        if any(isinstance(v, Tensor) for v in denoiser.cond.values()):
            raise UserError("the wrapped Denoiser carries condition tensors; pass them as cond=/uncond= to CFGDenoiser instead")
        if num_classes is None:
            num_classes = getattr(getattr(denoiser.model_fn, "config", None), "num_classes", None)
        self.branch_cond = self._checked(dict(cond), num_classes, allow_null=False)
        uncond = self._default_uncond(dict(cond)) if uncond is None else dict(uncond)
        self.branch_uncond = self._checked(uncond, num_classes, allow_null=True)

    @staticmethod
    def _check_interval(interval: tuple[float, float] | None, unit: str) -> tuple[tuple[float, float] | None, str]:
        if unit not in ("t", "sigma"):
            raise UserError(f"interval_unit must be 't' (index time) or 'sigma' (sigma/alpha), got {unit!r}")
        if interval is None:
            return None, unit
        lo, hi = (float(v) for v in interval)
        if not lo <= hi:
            raise UserError(f"guidance interval {interval!r} is empty; give (lo, hi) with lo <= hi")
        return (lo, hi), unit

    @staticmethod
    def _checked(cond: dict[str, Any], num_classes: int | None, *, allow_null: bool) -> dict[str, Any]:
        if "class_labels" in cond:
            what = "uncond class_labels" if allow_null else "class_labels"
            cond["class_labels"] = check_labels(cond["class_labels"], num_classes, allow_null=allow_null, what=what)
        return cond

    def _default_uncond(self, cond: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in cond.items():
            if key == "class_labels":
                null = getattr(self.model_fn, "null_label", None)
                if null is None:
                    raise UserError("uncond=None needs a model with a null_label; pass uncond={'class_labels': NULL} explicitly")
                out[key] = null
            elif key == "context_mask":
                out[key] = value
            else:
                out[key] = torch.zeros_like(torch.as_tensor(value))
        return out

    def _active(self, t: Tensor) -> Tensor:
        """Per-sample flags: is guidance applied at these times?"""
        if self.interval is None:
            return torch.ones(t.shape, dtype=torch.bool)
        v = t if self.interval_unit == "t" else noise_level(self.schedule, t)
        return (v >= self.interval[0]) & (v <= self.interval[1])

    def __call__(self, x: Tensor, t: Tensor | float, **shared: Any) -> DenoiserOutput:
        t = self.time_tensor(t, x)
        clash = sorted(set(shared) & set(self.branch_cond))
        if clash:
            raise UserError(f"conditions {clash} are given both to CFGDenoiser and at call time; give them once")
        active = self._active(t)
        w, batch = self.guidance_scale, x.shape[0]
        if w == 1.0 or not bool(active.any()):
            return self.denoiser(x, t, **shared, **_on(expand_conditions(self.branch_cond, batch), x.device))
        paired = _on(pair_conditions(self.branch_cond, self.branch_uncond, batch), x.device)
        out = self.denoiser(torch.cat([x, x]), t.repeat(2), **repeat_conditions(shared, batch), **paired)
        (x0_c, _), (eps_c, eps_u) = out.x0.chunk(2), out.eps.chunk(2)
        alpha, sigma = out.alpha[:batch], out.sigma[:batch]
        eps = eps_u + w * (eps_c - eps_u)
        x0 = x0_from_eps(x, eps, alpha, sigma)
        if self.rescale > 0.0:
            space = self.rescale_space
            guided = target_for(space, x0, eps, alpha, sigma)
            conditional = target_for(space, x0_c, eps_c, alpha, sigma)
            x0, eps = prediction_to_x0_eps(rescale_guidance(guided, conditional, self.rescale), space, x, alpha, sigma)
        if not bool(active.all()):
            keep = active.to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
            x0, eps = torch.where(keep, x0, x0_c), torch.where(keep, eps, eps_c)
        var = None if out.var_interp is None else out.var_interp[:batch]  # a learned variance: the conditional branch's
        return DenoiserOutput(x0=x0, eps=eps, alpha=alpha, sigma=sigma, var_interp=var)


# ----- classifier guidance -------------------------------------------------------------------
def mean_shift(mean: Tensor, var: Tensor | float, grad: Tensor, scale: float) -> Tensor:
    """Classifier-guided ancestral mean ``mu + s Sigma grad_x log p_phi(y | x_t)`` (Dhariwal & Nichol 2021, Alg. 1).

    ``var`` is the step's (diagonal) variance Sigma, ``grad`` the classifier gradient at x_t
    (:meth:`ClassifierGuidedDenoiser.classifier_grad`), ``scale`` the gradient scale s >= 0.
    """
    scale = _check_scale("classifier scale", scale, "use 0 (no guidance) or a positive gradient scale")
    return mean + scale * var * grad


class ClassifierGuidedDenoiser(GuidedDenoiser):
    """Classifier guidance in eps form (Dhariwal & Nichol 2021, Alg. 2), or in mean-shift form (Alg. 1).

    ``form="eps"`` (default) works with every sampler; ``form="mean"`` leaves the denoiser's output alone
    and lets the ancestral ``ddpm`` sampler shift each step's mean by ``s Sigma grad`` through
    :meth:`ancestral_shift` (``difflab.sample`` refuses ``form="mean"`` with any other sampler).

    ``eps_hat = eps - s sigma_t grad_x log p_phi(y | x_t, t)``: the score of ``p_t(x) p_phi(y | x)^s``.
    ``classifier(x_t, t) -> logits`` (B, K) takes t in index units like the diffusion model (e.g. a
    :class:`~difflab.nets.classifier.NoisyClassifier`). ``labels``: one class or one per sample.
    Wrap a :class:`CFGDenoiser` to combine both guidances. :attr:`classifier_calls` counts classifier
    evaluations (each with a backward pass); they are not network calls of the diffusion model (NFE).
    """

    def __init__(
        self, denoiser: Denoiser, classifier: Classifier, labels: Tensor | int, scale: float, *, num_classes: int | None = None,
        form: str = "eps",
    ) -> None:
        super().__init__(denoiser)
        if form not in ("eps", "mean"):
            raise UserError(f"classifier guidance form must be 'eps' (any sampler) or 'mean' (ancestral ddpm), got {form!r}")
        self.form = form
        self.classifier = classifier
        self.scale = _check_scale("classifier scale", scale, "use 0 (no guidance) or a positive gradient scale, e.g. 1-10")
        if num_classes is None:
            num_classes = getattr(getattr(classifier, "config", None), "num_classes", None)
        self.num_classes = num_classes
        self.labels = check_labels(labels, self.num_classes, what="classifier labels")
        self.classifier_calls = 0

    def classifier_grad(self, x: Tensor, t: Tensor | float) -> Tensor:
        """grad_x log p_phi(y | x_t, t) for each sample's label, shape and dtype of ``x``."""
        t = self.time_tensor(t, x)
        labels = check_labels(self.labels, self.num_classes, x.shape[0], what="classifier labels").to(x.device)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits = self.classifier(xg, t.to(device=x.device, dtype=torch.float32))
            if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
                shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                raise UserError(f"classifier returned {shape}; it must return logits of shape ({x.shape[0]}, num_classes)")
            check_labels(labels, logits.shape[1], what="classifier labels")
            logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)
            (grad,) = torch.autograd.grad(logp.gather(1, labels[:, None]).sum(), xg)
        self.classifier_calls += 1
        return grad.detach()

    def ancestral_shift(self, x: Tensor, t: Tensor | float, mean: Tensor, var: Tensor | float) -> Tensor:
        """The ``form="mean"`` step: mu + s Sigma grad log p_phi(y | x_t) (Alg. 1), called by the ddpm sampler."""
        return mean_shift(mean, var, self.classifier_grad(x, t), self.scale)

    def __call__(self, x: Tensor, t: Tensor | float, **cond: Any) -> DenoiserOutput:
        out = self.denoiser(x, t, **cond)
        if self.scale == 0.0 or self.form == "mean":  # mean form: the ancestral sampler shifts its mean instead
            return out
        eps = out.eps - self.scale * out.sigma * self.classifier_grad(x, t)
        return DenoiserOutput(x0=x0_from_eps(x, eps, out.alpha, out.sigma), eps=eps, alpha=out.alpha, sigma=out.sigma,
                              var_interp=out.var_interp)
