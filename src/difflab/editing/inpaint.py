"""Inpainting with an unconditional or conditional denoiser, without retraining.

Replacement (Song et al. 2021b, app. I.2; the "known region" step of Lugmayr et al. 2022, eq. 8): after every
sampler step to time s, the known entries are overwritten by a fresh draw of q(x_s | x_0 = known) =
N(alpha_s known, sigma_s^2 I); at the clean end (sigma = 0) this is ``known`` itself, so the output keeps the
known entries exactly. It works with every sampler through the sampler callback (:func:`inpaint`).

RePaint (Lugmayr et al. 2022, Alg. 1): replacement on an ancestral (or DDIM) step, plus resampling: at every
``jump``-th time the state is noised back ``jump`` steps with q(x_t | x_s) (one Gaussian draw,
:func:`difflab.process.transition`, the same distribution as ``jump`` single forward steps) and denoised
again, ``resample - 1`` times, so that the generated region harmonises with the known one
(:func:`repaint`; the paper's setting is 250 steps, jump 10, resample 10). Multistep ODE solvers keep a
history of model outputs that a jump back in time invalidates, so RePaint takes DDPM or DDIM steps only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import Denoiser, as_denoiser
from difflab.errors import UserError
from difflab.noise import NoiseSource
from difflab.process import transition
from difflab.samplers._common import Point, StepCallback, check_eta, point
from difflab.samplers.api import DEFAULT_GRIDS, FALLBACK_GRID, SampleResult, TrackedDenoiser, initial_noise, sample
from difflab.samplers.ddim import ddim_step
from difflab.samplers.ddpm import check_variance, ddpm_step
from difflab.samplers.grids import make_grid
from difflab.samplers.registry import get_sampler, sampler_options
from difflab.schedules import NoiseSchedule
from difflab.space import ProjectedNoise

REPAINT_STEPS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {"ddpm": ddpm_step, "ddim": ddim_step}
REPAINT_CHECKS: dict[str, Callable[[Any], None]] = {"ddpm": check_variance, "ddim": check_eta}  # each one's option


def known_mask(keep: Tensor, known: Tensor) -> Tensor:
    """``keep`` (1 / True where an entry is known) as a bool tensor broadcastable to ``known``'s shape.

    Accepted: the full shape (B, C, ...), one mask for all channels (B, 1, ...), one for the batch (1, C, ...)
    or just the spatial shape (...). Anything else is a one-line error naming both shapes.
    """
    keep = torch.as_tensor(keep, device=known.device)
    given = tuple(keep.shape)
    if keep.ndim == known.ndim - 2:
        keep = keep[None, None]
    try:
        shape = torch.broadcast_shapes(keep.shape, known.shape)
    except RuntimeError:
        shape = None
    if shape != known.shape:
        raise UserError(f"the mask has shape {given} but the image has {tuple(known.shape)}; give a mask of the "
                        f"image's size, e.g. {tuple(known.shape[-2:])} (one value per pixel)")
    if keep.dtype != torch.bool:
        if not bool(((keep == 0) | (keep == 1)).all()):
            raise UserError("the mask holds values other than 0 and 1; threshold it (1 = known, 0 = to fill)")
        keep = keep.bool()
    return keep


def replace_known(x: Tensor, known: Tensor, keep: Tensor, at: Point, noise: NoiseSource) -> Tensor:
    """x with its known entries replaced by a draw of q(x_t | x_0 = known) at ``at``; exactly ``known`` at the clean end."""
    if at.clean:
        return torch.where(keep, known, x)
    return torch.where(keep, at.alpha * known + at.sigma * noise.like(known), x)


def replacement_callback(known: Tensor, keep: Tensor, schedule: NoiseSchedule, timesteps: Tensor,
                         noise: NoiseSource) -> StepCallback:
    """The sampler callback of replacement: after step i the state is at ``timesteps[i + 1]``."""
    points = [point(schedule, t) for t in timesteps.tolist()]

    def callback(i: int, x: Tensor, denoised: Tensor) -> Tensor:
        return replace_known(x, known, keep, points[i + 1], noise)

    return callback


def _prepare(model_fn: Any, known: Tensor, keep: Tensor, schedule: Any, parameterization: str,
             generator: Any) -> tuple[Denoiser, Tensor, NoiseSource]:
    if not isinstance(known, Tensor) or known.ndim < 2:
        raise UserError("known must be a tensor of shape (batch, ...), e.g. images of shape (B, C, H, W)")
    keep = known_mask(keep, known)
    if bool(keep.all()):
        warnings.warn("the mask keeps every entry, so there is nothing to fill: the output is the input (mark the region "
                      "to fill with 0, white in a PNG mask)", UserWarning, stacklevel=3)
    elif not bool(keep.any()):
        warnings.warn("the mask keeps nothing, so this is plain generation (mark known entries with 1, black in a PNG mask)",
                      UserWarning, stacklevel=3)
    denoiser = as_denoiser(model_fn, schedule, parameterization)
    return denoiser, keep, NoiseSource.from_any(generator, known.shape[0])


def inpaint(
    model_fn: "Denoiser | Callable[..., Tensor]",
    known: Tensor,
    keep: Tensor,
    sampler: str = "ddpm",
    steps: int = 50,
    schedule: "NoiseSchedule | str | dict[str, Any] | None" = None,
    generator: "torch.Generator | Sequence[torch.Generator] | NoiseSource | None" = None,
    *,
    parameterization: str = "eps",
    grid: str | None = None,
    noise: Tensor | None = None,
    cond: dict[str, Any] | None = None,
    progress: bool = False,
    **options: Any,
) -> SampleResult:
    """Replacement inpainting with any registered sampler: fill the entries where ``keep`` is False.

    ``known``: the input (B, ...), in the model's data space (e.g. [-1, 1] images or latents); its entries
    where ``keep`` is False are ignored. ``keep``: see :func:`known_mask`. ``noise``: x_T (default: drawn from
    ``generator`` in the denoiser's space). Every sampler step ends with :func:`replace_known`; the output's
    known entries equal ``known`` exactly (a last overlay makes sure of it for solvers that correct the state
    after the callback, e.g. UniPC). Multistep solvers keep their history of model outputs, which the
    replacement does not rewrite; DDPM and DDIM are the exact fits.
    """
    denoiser, keep, source = _prepare(model_fn, known, keep, schedule, parameterization, generator)
    if bool(keep.all()):
        return SampleResult(known.clone(), 0)
    name = getattr(get_sampler(sampler), "sampler_name", sampler)
    timesteps = make_grid(denoiser.schedule, steps, grid or DEFAULT_GRIDS.get(name, FALLBACK_GRID))
    x = initial_noise(denoiser, known.shape[1:], source, known.shape[0], dtype=known.dtype, device=known.device) \
        if noise is None else noise
    callback = replacement_callback(known, keep, denoiser.schedule, timesteps, ProjectedNoise(source, denoiser.space))
    out = sample(denoiser, x, sampler, timesteps=timesteps, generator=source, cond=cond, callback=callback,
                 progress=progress, **options)
    return SampleResult(torch.where(keep, known, out.samples), out.nfe)


def repaint_path(steps: int, jump: int, resample: int) -> list[int]:
    """The grid indices RePaint visits, from 0 (x_T) to ``steps`` (the clean end).

    With the paper's time u = steps - 1 - k of grid index k (Lugmayr et al. 2022, sec. 4.2 and their time
    schedule): after arriving at every u = 0, jump, 2 jump, ... below steps - jump, go back up ``jump`` indices
    ``resample - 1`` times before going on. ``resample = 1`` is plain replacement (0, 1, ..., steps).
    """
    for name, value in (("steps", steps), ("jump", jump), ("resample", resample)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"RePaint {name} must be an integer >= 1, got {value!r}")
    if resample > 1 and jump >= steps:
        raise UserError(f"RePaint jump length {jump} needs more than {jump} steps, got {steps}; "
                        f"use a jump below {steps} (the paper: 250 steps, jump 10)")
    left = {u: resample - 1 for u in range(0, steps - jump, jump)}
    k, path = 0, [0]
    while k < steps:
        k += 1
        path.append(k)
        u = steps - 1 - k
        if k < steps and left.get(u, 0) > 0:
            left[u] -= 1
            k -= jump
            path.append(k)
    return path


def repaint(
    model_fn: "Denoiser | Callable[..., Tensor]",
    known: Tensor,
    keep: Tensor,
    steps: int = 250,
    jump: int = 10,
    resample: int = 10,
    schedule: "NoiseSchedule | str | dict[str, Any] | None" = None,
    generator: "torch.Generator | Sequence[torch.Generator] | NoiseSource | None" = None,
    *,
    sampler: str = "ddpm",
    parameterization: str = "eps",
    grid: str = "uniform",
    noise: Tensor | None = None,
    cond: dict[str, Any] | None = None,
    progress: bool = False,
    **options: Any,
) -> SampleResult:
    """RePaint (Lugmayr et al. 2022, Alg. 1) over a ``steps``-step grid: ``sampler`` "ddpm" (the paper; option
    ``variance``) or "ddim" (option ``eta``) steps with replacement, and ``resample - 1`` jumps of ``jump`` grid
    steps back at every ``jump``-th time (:func:`repaint_path`). Arguments as in :func:`inpaint`. Network
    evaluations: ``steps + (resample - 1) * jump * floor((steps - 1) / jump)`` for ``resample > 1``.
    """
    if sampler not in REPAINT_STEPS:
        raise UserError(f"RePaint resamples by jumping back in time, which multistep solvers' histories do not survive; "
                        f"use sampler {' or '.join(REPAINT_STEPS)}, not {sampler!r} (inpaint() takes any sampler)")
    allowed = sampler_options(sampler)  # the ddpm / ddim sampler's own options (variance / eta)
    if set(options) - set(allowed):
        raise UserError(f"unknown option(s) {sorted(set(options) - set(allowed))} for RePaint with {sampler}; valid: {sorted(allowed)}")
    (option, default), = allowed.items()  # ddpm: variance, ddim: eta
    REPAINT_CHECKS[sampler](options.get(option, default))
    denoiser, keep, source = _prepare(model_fn, known, keep, schedule, parameterization, generator)
    if bool(keep.all()):
        return SampleResult(known.clone(), 0)
    path = repaint_path(steps, jump, resample)
    points = [point(denoiser.schedule, t) for t in make_grid(denoiser.schedule, steps, grid).tolist()]
    projected = ProjectedNoise(source, denoiser.space)
    x = initial_noise(denoiser, known.shape[1:], source, known.shape[0], dtype=known.dtype, device=known.device) \
        if noise is None else noise
    downs = sum(b > a for a, b in zip(path, path[1:]))
    tracked = TrackedDenoiser(denoiser, dict(cond or {}), f"repaint ({sampler})", downs, progress)
    start = denoiser.nfe
    step = REPAINT_STEPS[sampler]
    try:
        for a, b in zip(path, path[1:]):
            if b > a:  # denoise one step, then put the known region back at the new time
                x, _ = step(tracked, x, points[a], points[b], projected, **options)
                x = replace_known(x, known, keep, points[b], projected)
            else:  # jump back: x_b ~ q(x_b | x_a) for the whole sample
                back = transition(x, points[a].alpha, points[a].sigma, points[b].alpha, points[b].sigma)
                x = back.mean + math.sqrt(back.var) * projected.like(x)
    finally:
        tracked.close()
    return SampleResult(torch.where(keep, known, x), denoiser.nfe - start)
