"""DiffusionPipeline: a trained image model, its schedule and a sampler behind one call.

>>> pipe = DiffusionPipeline.from_pretrained("runs/demo")          # doctest: +SKIP
>>> out = pipe(num_images=4, num_inference_steps=50, sampler="ddim", seed=0)  # doctest: +SKIP
>>> out.images[0].save("sample.png")                                # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difflab.conditioning import Conditioner
from difflab.denoiser import Denoiser
from difflab.guidance import CFGDenoiser, ClassifierGuidedDenoiser
from difflab.errors import UserError
from difflab.nets.unet import UNet
from difflab.modalities import get_modality
from difflab.noise import NoiseSource
from difflab.pipelines.diffusion_io import load_diffusion_pipeline, pipeline_settings, save_diffusion_pipeline
from difflab.samplers import get_sampler, sample, sampler_names
from difflab.samplers.registry import sampler_options
from difflab.schedules import NoiseSchedule


@dataclass
class PipelineOutput:
    images: list[Any]  # the modality's media, one per sample: PIL images for images (diffusers' name)
    samples: Tensor  # (B, *sample_shape); images in [-1, 1]
    nfe: int
    latents: Tensor | None = None  # the final diffusion state of a latent model (before decoding)


VAE_FOLDER = "vae"


def decode_latents(vae: Any, latents: Tensor) -> Tensor:
    """Images of final latents: ``vae.decode(latents / scaling_factor)`` (Rombach et al. 2022, sec. 4.3.2)."""
    return vae.decode(latents / vae.scaling_factor)


def eta_option(sampler: Any, eta: float | None) -> dict[str, float]:
    """``{"eta": eta}`` for a sampler with an ``eta`` option; ``{}`` when eta is None, or 0 for a
    sampler without one (diffusers' ``eta=0.0`` with a deterministic scheduler); else a UserError."""
    fn = get_sampler(sampler)
    if eta is None or ("eta" not in sampler_options(fn) and eta == 0):
        return {}
    if "eta" not in sampler_options(fn):
        takers = [n for n in sampler_names() if "eta" in sampler_options(n)]
        name = getattr(fn, "sampler_name", getattr(fn, "__name__", "sampler"))
        raise UserError(f"eta={eta} needs a stochastic sampler, and {name!r} has no eta option; "
                        f"use one of {', '.join(takers)}, or leave eta at 0")
    return {"eta": eta}


def seeded_noise(batch: int, seed: int | None, generator: Any) -> NoiseSource:
    """Per-image noise: image i from seed ``seed + i`` when ``seed`` is given, else from ``generator`` (one, one per
    image, or None)."""
    if seed is not None:
        generator = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    return NoiseSource.from_any(generator, batch)


PER_IMAGE_ARGUMENTS = ("class_labels", "prompt", "negative_prompt", "concat")


class DiffusionPipeline:
    """An unconditional (for now) image diffusion model ready to sample.

    ``sampler`` may be changed at any time (``pipe.sampler = "dpmpp_2m"``); every registered sampler works.
    ``learn_variance``: the UNet also outputs its variance (Nichol & Dhariwal 2021), which the ddpm sampler
    uses; None infers it from the UNet (out_channels = 2 in_channels). ``vae``: a latent diffusion model's
    autoencoder (:class:`~difflab.nets.autoencoder.AutoencoderKL`); the UNet then works on its scaled latents
    (``resolution`` is the latent size) and samples are decoded to images. ``sample_shape`` ``(C, *spatial)``
    (e.g. ``(3, 32, 48)``) gives non-square samples; ``resolution=r`` means ``(C, r, r)``. ``modality``: the name
    of the data's modality (``"image"``), stored in the folder.
    """

    def __init__(
        self,
        unet: UNet,
        schedule: NoiseSchedule,
        parameterization: str = "eps",
        *,
        resolution: int | None = None,
        sample_shape: Sequence[int] | None = None,
        modality: Any = "image",
        sampler: str = "ddim",
        conditioner: Conditioner | None = None,
        extra_config: dict[str, Any] | None = None,
        learn_variance: bool | None = None,
        vae: Any = None,
    ) -> None:
        in_channels = getattr(unet.config, "in_channels", None)
        out_channels = getattr(unet.config, "resolved_out_channels", getattr(unet.config, "out_channels", in_channels))
        doubled = in_channels is not None and out_channels == 2 * in_channels
        if learn_variance is None:
            learn_variance = doubled
        if learn_variance and not doubled:
            raise UserError(f"learn_variance needs a network with out_channels = 2 x in_channels, got {out_channels} and "
                            f"{in_channels}; set learn_variance false or rebuild the model")
        self.learn_variance = bool(learn_variance)
        self.unet = unet.eval()
        self.schedule = schedule
        self.parameterization = parameterization
        self.sample_shape, self.resolution = resolve_sample_shape(unet.config, resolution, sample_shape)
        self.modality = str(getattr(modality, "name", modality))  # a registered modality's name (difflab.modalities)
        self.sampler = sampler
        self.conditioner = conditioner or Conditioner("none")
        self.extra_config = dict(extra_config or {})
        self.vae = vae.eval() if vae is not None else None
        if vae is not None and vae.latent_channels != unet.config.in_channels:
            raise UserError(f"the UNet takes {unet.config.in_channels} channels but the autoencoder's latents have "
                            f"{vae.latent_channels}; pair the UNet with the autoencoder it was trained on")

    # ----- persistence ----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The pipeline settings written into ``model_index.json`` (schedule, sample_shape, sampler, ...)."""
        return pipeline_settings(self)

    def save_pretrained(self, path: str | Path) -> None:
        """Write a pipeline folder: ``model_index.json``, ``unet/`` and, for a latent model, ``vae/``."""
        save_diffusion_pipeline(self, Path(path))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "DiffusionPipeline":
        """Load a folder written by :meth:`save_pretrained` (or a difflab v1 model folder, with a deprecation warning)."""
        return load_diffusion_pipeline(cls, Path(path)).to(device)

    def to(self, device: str | torch.device) -> "DiffusionPipeline":
        self.unet.to(device)
        if self.vae is not None:
            self.vae.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def denoiser(self, batch: int = 1, class_labels: Any = None, prompt: Any = None, negative_prompt: Any = None,
                 guidance_scale: float = 1.0, guidance_rescale: float = 0.0,
                 guidance_interval: tuple[float, float] | None = None, classifier: Any = None,
                 classifier_scale: float = 1.0, sampler: str | None = None, *, concat: Any = None,
                 aug_level: float = 0.0, noise: Any = None) -> Denoiser:
        """The model as a denoiser, guided as :func:`guided_denoiser` says."""
        denoiser = Denoiser(self.unet, self.schedule, self.parameterization, learn_variance=self.learn_variance)
        return guided_denoiser(denoiser, self.conditioner, self.device, batch, class_labels, prompt, negative_prompt,
                               guidance_scale, guidance_rescale, guidance_interval, classifier, classifier_scale,
                               sampler or self.sampler, concat=concat, aug_level=aug_level, noise=noise)

    # ----- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        num_images: int = 1,
        num_inference_steps: int = 50,
        sampler: str | None = None,
        eta: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        seed: int | None = None,
        progress: bool = True,
        *,
        class_labels: Any = None,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        guidance_scale: float = 1.0,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        classifier: Any = None,
        classifier_scale: float = 1.0,
        concat: Any = None,
        aug_level: float = 0.0,
        **sampler_options: Any,
    ) -> PipelineOutput:
        """Sample ``num_images`` images; image i uses seed ``seed + i`` (or ``generator[i]``).

        ``class_labels`` (one or one per image; ints or class names) or ``prompt`` / ``negative_prompt``
        condition a conditional model; ``guidance_scale`` w > 1 applies classifier-free guidance,
        ``guidance_rescale`` (phi, Lin et al. 2023) and ``guidance_interval`` ((lo, hi) in index time)
        refine it. ``classifier`` (a :class:`~difflab.nets.classifier.NoisyClassifier` or its folder) with
        ``classifier_scale`` s adds classifier guidance towards ``class_labels``. ``concat`` (``{"low_res": tensor}``
        or a tensor (1 or B, C, h, w)) conditions a model with a concat condition (SR3, cascades), noise-augmented
        at the fixed level ``aug_level`` in [0, 1] (Ho et al. 2021; 0: clean). ``eta`` is passed to samplers that take it (DDIM). Other keyword options go to the sampler.
        """
        if num_images < 1:
            raise UserError(f"num_images must be >= 1, got {num_images}")
        self._check_steps(num_inference_steps)
        name = sampler or self.sampler
        sampler_options.update(eta_option(name, eta))  # unknown names fail here, listing the valid ones
        noise = seeded_noise(num_images, seed, generator)
        if isinstance(classifier, (str, Path)):
            from difflab.nets.classifier import NoisyClassifier

            classifier = NoisyClassifier.from_pretrained(classifier)
        denoiser = self.denoiser(num_images, class_labels, prompt, negative_prompt, guidance_scale, guidance_rescale,
                                 guidance_interval, classifier, classifier_scale, name, concat=concat,
                                 aug_level=aug_level, noise=noise)
        x_T = denoiser.space.noise(self.sample_shape, noise, device=self.device)
        result = sample(denoiser, x_T, sampler=name, steps=num_inference_steps, generator=noise,
                        progress=progress, **sampler_options)
        latents, final = None, result.samples
        if self.vae is not None:
            latents, final = final.float().cpu(), decode_latents(self.vae, final)
        modality = get_modality(self.modality)
        samples = modality.finalize(final).float().cpu()
        return PipelineOutput(images=modality.to_media(samples), samples=samples, nfe=result.nfe, latents=latents)

    def _check_steps(self, steps: int) -> None:
        if not 1 <= steps <= self.schedule.T:
            raise UserError(f"num_inference_steps={steps} is out of range: the model was trained with "
                            f"T={self.schedule.T} steps; use 1 to {self.schedule.T}")

    def in_batches(self, num_images: int, batch_size: int, *, seed: int = 0, **kwargs: Any) -> PipelineOutput:
        """``num_images`` images, ``batch_size`` per forward pass; image i uses seed ``seed + i`` whatever the batch size.

        ``kwargs`` are those of :meth:`__call__`; per-image lists (``class_labels``, ``prompt``,
        ``negative_prompt`` with one entry per image) are split along with the batches.
        """
        parts = run_in_batches(lambda n, first_seed, rows: self(num_images=n, seed=first_seed, **rows),
                               num_images, batch_size, seed, kwargs)
        latents = None if parts[0].latents is None else torch.cat([part.latents for part in parts])
        return PipelineOutput(images=[image for part in parts for image in part.images],
                              samples=torch.cat([part.samples for part in parts]), nfe=parts[0].nfe, latents=latents)


def resolve_sample_shape(config: Any, resolution: int | None, sample_shape: Sequence[int] | None
                         ) -> tuple[tuple[int, ...], int | None]:
    """``(sample_shape, resolution)`` from either argument: ``sample_shape`` is ``(C, *spatial)`` with C the
    UNet's input channels; ``resolution`` the side of a square (cubic) sample, ``None`` when the sides differ."""
    if not hasattr(config, "dims"):  # not a UNet: the network's own layout, as the data gave it
        if sample_shape is None:
            raise UserError(f"a {type(config).__name__} network needs sample_shape= (the shape of one sample)")
        shape = tuple(int(s) for s in sample_shape)
        return shape, (shape[1] if len(shape) == 3 and shape[1] == shape[2] else None)
    dims = config.dims
    if sample_shape is None:
        if resolution is None:
            raise UserError("DiffusionPipeline needs resolution= (the sample side) or sample_shape= (C, H, W)")
        sample_shape = (config.in_channels, *(int(resolution),) * dims)
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) != 1 + dims or shape[0] != config.in_channels or min(shape) < 1:
        raise UserError(f"sample_shape={shape} does not fit the UNet: give (channels={config.in_channels}, "
                        f"then {dims} positive sizes)")
    if resolution is not None and any(side != resolution for side in shape[1:]):
        raise UserError(f"resolution={resolution} contradicts sample_shape={shape}; pass only one of them")
    return shape, (shape[1] if len(set(shape[1:])) == 1 else None)


def guided_denoiser(denoiser: Denoiser, conditioner: Conditioner, device: torch.device, batch: int = 1,
                    class_labels: Any = None, prompt: Any = None, negative_prompt: Any = None,
                    guidance_scale: float = 1.0, guidance_rescale: float = 0.0,
                    guidance_interval: tuple[float, float] | None = None, classifier: Any = None,
                    classifier_scale: float = 1.0, sampler: Any = "ddim", *, concat: Any = None,
                    aug_level: float = 0.0, noise: Any = None) -> Denoiser:
    """``denoiser`` classifier-free guided (Ho & Salimans 2022) for a conditional model, then classifier
    guided (Dhariwal & Nichol 2021) when a noise-aware ``classifier`` is given, in the mean-shift form
    (Alg. 1) for the ancestral ``sampler`` and in the eps form (Alg. 2) for all others.

    ``conditioner`` turns labels / prompts (and a ``concat`` condition at ``aug_level``, augmented with
    ``noise``) into the conditional and unconditional network arguments.
    """
    own_labels = class_labels if conditioner.kind == "class" or classifier is None else None
    cond, uncond = conditioner.sampling_kwargs(batch, own_labels, prompt, negative_prompt, concat=concat,
                                               aug_level=aug_level, noise=noise)
    if conditioner.kind == "none" and cond:  # a concat condition alone: in both branches, nothing to guide
        denoiser.cond = {**denoiser.cond, **{k: v.to(device) for k, v in cond.items()}}
    if conditioner.kind != "none":
        denoiser = CFGDenoiser(denoiser, {k: v.to(device) for k, v in cond.items()},
                               {k: v.to(device) for k, v in uncond.items()}, guidance_scale,
                               rescale=guidance_rescale, interval=guidance_interval, num_classes=conditioner.num_classes)
    elif guidance_scale != 1.0:
        raise UserError("guidance_scale needs a conditional model (trained with --conditioning class or text)")
    if classifier is not None:
        if class_labels is None:
            raise UserError("classifier guidance needs the class to steer towards; pass class_labels / --class-label")
        form = "mean" if getattr(get_sampler(sampler), "mean_shift_guidance", False) else "eps"
        denoiser = ClassifierGuidedDenoiser(denoiser, classifier.to(device), class_labels, classifier_scale, form=form)
    return denoiser


def run_in_batches(call: Any, num_images: int, batch_size: int, seed: int, kwargs: dict[str, Any]) -> list[Any]:
    """``call(n, first_seed, rows)`` for consecutive batches of at most ``batch_size`` images.

    ``rows`` is ``kwargs`` with the per-image lists (:data:`PER_IMAGE_ARGUMENTS` with one entry per image)
    cut to the batch; the batch starting at image ``first`` gets ``first_seed = seed + first``.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    parts = []
    for first in range(0, num_images, batch_size):
        n = min(batch_size, num_images - first)
        rows = {k: _rows(v, first, n, num_images) if k in PER_IMAGE_ARGUMENTS else v for k, v in kwargs.items()}
        parts.append(call(n, seed + first, rows))
    return parts


def _rows(value: Any, first: int, n: int, total: int) -> Any:
    """Rows ``first .. first + n`` of a per-image sequence (or of each entry of a dict such as ``concat``);
    anything else (one value for all) as it is."""
    if isinstance(value, dict):
        return {k: _rows(v, first, n, total) for k, v in value.items()}
    if not isinstance(value, str) and isinstance(value, (list, tuple, torch.Tensor)) and len(value) == total:
        return value[first:first + n]
    return value
