"""Text2ImagePipeline: prompt -> text encoder -> guided latent diffusion -> autoencoder decoder -> images.

Latent diffusion (Rombach et al. 2022): the UNet denoises ``z * scaling_factor`` in the autoencoder's
latent space under cross-attention to the prompt tokens, classifier-free guided (Ho & Salimans 2022),
and the final latent is decoded by ``vae.decode(latent / scaling_factor)``. Without a ``vae`` the same
pipeline runs in pixel space. The sampling core is difflab's: the denoiser and guidance of
:func:`~difflab.pipelines.diffusion.guided_denoiser` and any sampler of :func:`difflab.sample`.

>>> pipe = Text2ImagePipeline.from_pretrained("sd-folder")                          # doctest: +SKIP
>>> out = pipe("a red circle", num_inference_steps=25, guidance_scale=7.5, sampler="ddim",
...            generator=torch.Generator().manual_seed(0))                           # doctest: +SKIP
>>> out.images[0].save("circle.png")                                                # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from difflab.conditioning import Conditioner
from difflab.data.images import tensor_to_pil
from difflab.denoiser import Denoiser
from difflab.errors import UserError
from difflab.interop.diffusers_config import SchedulerSpec
from difflab.interop.diffusers_sd import DiffusersUNet
from difflab.nets.text_base import TextEncoder, check_prompts
from difflab.nets.text_cache import CachedTextEncoder
from difflab.noise import NoiseSource
from difflab.pipelines.diffusion import DiffusionPipeline, decode_latents, eta_option, guided_denoiser, run_in_batches
from difflab.pipelines.text2image_io import (
    Components,
    check_dtype,
    is_diffusion_pipeline_folder,
    load_components,
    save_components,
)
from difflab.samplers import get_sampler, sample
from difflab.samplers.registry import SamplerFn

OUTPUT_TYPES = ("pil", "pt")


@dataclass
class Text2ImageOutput:
    """``images``: PIL images (``output_type="pil"``) or a ``(B, C, H, W)`` tensor in [0, 1] (``"pt"``, as diffusers).

    ``samples`` are the decoded images in [-1, 1], ``latents`` the final state of the sampler (in the
    diffusion space, ``z * scaling_factor``), both float32 on the CPU; ``nfe`` counts UNet calls.
    """

    images: list[Image.Image] | Tensor
    samples: Tensor
    latents: Tensor
    nfe: int


def _autocast(device: torch.device, dtype: torch.dtype) -> Any:
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


class Text2ImagePipeline:
    """A text-to-image model (latent with ``vae``, pixel-space without) ready to sample.

    ``unet`` is a difflab :class:`~difflab.nets.unet.UNet` or a :class:`DiffusersUNet`; ``vae`` a difflab
    :class:`~difflab.nets.autoencoder.AutoencoderKL`, a :class:`~difflab.interop.diffusers_sd.DiffusersVAE` or
    None; ``scheduler`` says the noise schedule, parameterization and grid rules; ``resolution`` is the
    default latent (or pixel) size of a difflab model. ``dtype``: the networks' compute precision.
    """

    def __init__(self, unet: nn.Module, text_encoder: TextEncoder, scheduler: SchedulerSpec, vae: Any = None, *,
                 resolution: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.unet = unet.eval()
        self.vae = vae.eval() if vae is not None else None
        self.text_encoder = text_encoder.encoder if isinstance(text_encoder, CachedTextEncoder) else text_encoder
        self.conditioner = Conditioner("text", text_encoder=self.text_encoder)
        self.scheduler = scheduler
        self.resolution = resolution
        self.dtype = dtype
        if vae is not None and self.in_channels != vae.latent_channels:
            raise UserError(f"the UNet takes {self.in_channels} channels but the autoencoder's latents have "
                            f"{vae.latent_channels}; pair the UNet with the autoencoder it was trained on")

    # ----- construction and persistence ----------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, torch_dtype: torch.dtype | str | None = None,
                        device: str | torch.device = "cpu") -> Text2ImagePipeline:
        """Load a difflab or diffusers (Stable Diffusion) folder with ``model_index.json``, or a text-conditional
        :class:`DiffusionPipeline` folder written by ``difflab train`` (v2, or a v1 ``config.json`` folder).

        ``torch_dtype`` (float32 by default; float16, bfloat16) is the networks' precision: diffusers and
        transformers weights are loaded in it, difflab networks keep float32 weights and run under autocast;
        the sampler's state stays float32. float16 on the CPU raises a UserError (no fallback; use bfloat16).
        """
        dtype = check_dtype(torch_dtype, device)
        if is_diffusion_pipeline_folder(Path(path)):
            return cls.from_diffusion_pipeline(DiffusionPipeline.from_pretrained(path), dtype=dtype).to(device)
        c = load_components(Path(path), dtype)
        return cls(c.unet, c.text_encoder, c.scheduler, c.vae, resolution=c.resolution, dtype=dtype).to(device)

    @classmethod
    def from_diffusion_pipeline(cls, pipe: Any, vae: Any = None, dtype: torch.dtype = torch.float32) -> Text2ImagePipeline:
        """A text-conditional :class:`~difflab.pipelines.diffusion.DiffusionPipeline` as a Text2ImagePipeline;
        a latent model uses ``vae`` (default: the pipeline's own autoencoder), a pixel model none."""
        if pipe.conditioner.kind != "text":
            raise UserError(f"this model is conditioned on '{pipe.conditioner.kind}', not text; "
                            "train it with --conditioning text")
        spec = SchedulerSpec(pipe.schedule, pipe.parameterization)
        vae = vae if vae is not None else pipe.vae
        return cls(pipe.unet, pipe.conditioner.encoder, spec, vae, resolution=pipe.resolution, dtype=dtype)

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``model_index.json`` and the ``unet/ vae/ text_encoder/ tokenizer/ scheduler/`` subfolders."""
        save_components(Components(self.unet, self.vae, self.text_encoder, self.scheduler, self.resolution), Path(path))

    def to(self, device: str | torch.device) -> Text2ImagePipeline:
        self.unet.to(device)
        if self.vae is not None:
            self.vae.to(device)
        self.conditioner.encoder.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def in_channels(self) -> int:
        return self.unet.in_channels if isinstance(self.unet, DiffusersUNet) else self.unet.config.in_channels

    @property
    def factor(self) -> int:
        """Pixels per latent position along each axis (1 in pixel space)."""
        return self.vae.downsample_factor if self.vae is not None else 1

    @property
    def default_size(self) -> int:
        """Default image height and width in pixels."""
        latent = self.unet.sample_size if isinstance(self.unet, DiffusersUNet) else self.resolution
        if latent is None:
            raise UserError("this pipeline has no default size; pass height= and width=")
        return int(latent) * self.factor

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """``(C, h, w)`` of the diffusion state for a ``height`` x ``width`` image (nearest valid sizes in the error)."""
        height, width = height or self.default_size, width or self.default_size
        if self.vae is None:
            if height < 1 or width < 1:
                raise UserError(f"image size {height}x{width} is invalid; use positive sizes")
            return self.in_channels, height, width
        from difflab.nets.autoencoder import check_latent_size

        return (self.in_channels, *check_latent_size(height, width, self.factor))

    # ----- sampling ------------------------------------------------------------------------------
    def model_fn(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """The UNet in the pipeline's dtype; the prediction comes back in ``x``'s dtype."""
        with _autocast(x.device, self.dtype):
            return self.unet(x, t, **cond).to(x.dtype)

    def denoiser(self, prompts: list[str], negatives: list[str] | None, guidance_scale: float,
                 guidance_rescale: float = 0.0, sampler: Any = "dpmpp_2m") -> Denoiser:
        """The classifier-free guided denoiser of :func:`~difflab.pipelines.diffusion.guided_denoiser`."""
        learn_variance = not isinstance(self.unet, DiffusersUNet) and self.unet.config.out_channels == 2 * self.in_channels
        base = Denoiser(self.model_fn, self.scheduler.schedule, self.scheduler.parameterization, learn_variance=learn_variance)
        return guided_denoiser(base, self.conditioner, self.device, len(prompts), prompt=prompts, negative_prompt=negatives,
                               guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, sampler=sampler)

    def decode(self, latents: Tensor) -> Tensor:
        """Images (about [-1, 1], float32) of final latents: ``vae.decode(latents / scaling_factor)``."""
        if self.vae is None:
            return latents.float()
        with _autocast(latents.device, self.dtype):
            return decode_latents(self.vae, latents).float()

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        eta: float | None = None,
        sampler: str | SamplerFn = "dpmpp_2m",
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        latents: Tensor | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        *,
        guidance_rescale: float = 0.0,
        grid: str | None = None,
        progress: bool = True,
        **sampler_options: Any,
    ) -> Text2ImageOutput:
        """Images for ``prompt`` (one or a list), ``num_images_per_prompt`` each.

        ``guidance_scale`` w: classifier-free guidance ``eps_u + w (eps_c - eps_u)``, the unconditional
        branch being ``negative_prompt`` (default the empty prompt). ``sampler``: any registered name or a
        sampler function. ``generator``: one torch.Generator for the batch (diffusers' convention: the same
        seed gives diffusers' initial latents) or one per image. ``latents``: the initial noise
        ``(B, C, height / f, width / f)`` exactly as diffusers takes it (VP: standard normal). ``eta`` goes
        to samplers that take it (None: the sampler's default, 0 for ddim); 0 is ignored by the others. The grid follows the scheduler
        config (diffusers' spacing and final step) unless ``grid`` names a difflab grid. Other keyword
        options go to the sampler.
        """
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type {output_type!r} is not supported; use one of {', '.join(OUTPUT_TYPES)}")
        prompts, negatives = _per_image_prompts(prompt, negative_prompt, num_images_per_prompt)
        fn = get_sampler(sampler)
        sampler_options.update(eta_option(fn, eta))
        noise = NoiseSource.from_any(generator, len(prompts))
        x_T = self._initial_latents(latents, noise, self.latent_shape(height, width), len(prompts))
        timesteps = None if grid is not None else self.scheduler.timesteps(num_inference_steps, fn)
        if timesteps is not None:
            fn = self.scheduler.sampler(fn)
        denoiser = self.denoiser(prompts, negatives, guidance_scale, guidance_rescale, fn)
        result = sample(denoiser, x_T, fn, num_inference_steps, generator=noise, grid=grid, timesteps=timesteps,
                        progress=progress, **sampler_options)
        samples = self.decode(result.samples).clamp(-1, 1).cpu()
        images = tensor_to_pil(samples) if output_type == "pil" else (samples + 1) / 2
        return Text2ImageOutput(images, samples, result.samples.float().cpu(), result.nfe)

    # ----- editing (docs/editing.md) ----------------------------------------------------------------
    def _encode_pictures(self, image: Any) -> tuple[Tensor, Tensor]:
        """(pixels (B, 3, H, W) in [-1, 1], their diffusion-space latents ``vae.encode(x).mean * scaling_factor``)."""
        from difflab.pipelines.edit import load_image_tensor

        pixels = load_image_tensor(image, 3 if self.vae is not None else self.in_channels).to(self.device)
        self.latent_shape(pixels.shape[-2], pixels.shape[-1])  # sizes the autoencoder can take (nearest ones in the error)
        if self.vae is None:
            return pixels, pixels
        with _autocast(pixels.device, self.dtype):
            z = self.vae.encode(pixels).mean.float() * self.vae.scaling_factor
        return pixels, z

    @torch.no_grad()
    def img2img(self, image: Any, prompt: str | Sequence[str], strength: float = 0.6,
                negative_prompt: str | Sequence[str] | None = None, num_inference_steps: int = 25,
                guidance_scale: float = 7.5, sampler: str = "dpmpp_2m",
                generator: torch.Generator | Sequence[torch.Generator] | None = None, *, progress: bool = True,
                **sampler_options: Any) -> Text2ImageOutput:
        """SDEdit (Meng et al. 2022) in latent space: :func:`difflab.editing.sdedit` over the guided denoiser, on
        difflab's time grid of the sampler (not the scheduler config's spacing); one image per prompt."""
        from difflab.editing import sdedit

        pixels, z = self._encode_pictures(image)
        prompts, negatives = _prompts_for_pictures(prompt, negative_prompt, len(z))
        noise = NoiseSource.from_any(generator, len(z))
        denoiser = self.denoiser(prompts, negatives, guidance_scale, sampler=sampler)
        result = sdedit(denoiser, z, strength, sampler, num_inference_steps, generator=noise, progress=progress,
                        **sampler_options)
        samples = self.decode(result.samples).clamp(-1, 1).cpu()
        return Text2ImageOutput(tensor_to_pil(samples), samples, result.samples.float().cpu(), result.nfe)

    @torch.no_grad()
    def inpaint(self, image: Any, mask_image: Any, prompt: str | Sequence[str],
                negative_prompt: str | Sequence[str] | None = None, num_inference_steps: int = 50,
                guidance_scale: float = 7.5, method: str = "repaint", jump: int = 10, resample: int = 10,
                sampler: str = "ddpm", generator: torch.Generator | Sequence[torch.Generator] | None = None, *,
                seam_width: int | None = None, progress: bool = True, **sampler_options: Any) -> Text2ImageOutput:
        """Inpainting with a text-to-image model that was not trained for it: RePaint or replacement on the
        latents, then the decoded result overlaid on the picture in pixel space with a blended seam
        (:func:`~difflab.pipelines.edit.seam_overlay`), so the known pixels are the input's exactly."""
        from difflab.editing import inpaint, repaint
        from difflab.pipelines.edit import INPAINT_METHODS, SEAM_WIDTH, latent_keep, load_keep_mask, seam_overlay

        if method not in INPAINT_METHODS[:2]:
            raise UserError(f"method {method!r} is not available for a text-to-image folder; use repaint or replacement")
        pixels, z = self._encode_pictures(image)
        keep_px = load_keep_mask(mask_image, tuple(pixels.shape[-2:])).to(self.device)
        keep = keep_px if self.vae is None else latent_keep(keep_px, self.factor)
        prompts, negatives = _prompts_for_pictures(prompt, negative_prompt, len(z))
        noise = NoiseSource.from_any(generator, len(z))
        denoiser = self.denoiser(prompts, negatives, guidance_scale, sampler=sampler)
        if method == "repaint":
            result = repaint(denoiser, z, keep, num_inference_steps, jump, resample, generator=noise, sampler=sampler,
                             progress=progress, **sampler_options)
        else:
            result = inpaint(denoiser, z, keep, sampler, num_inference_steps, generator=noise, progress=progress,
                             **sampler_options)
        decoded = self.decode(result.samples).clamp(-1, 1)
        width = SEAM_WIDTH if seam_width is None else seam_width
        samples = (decoded if self.vae is None else seam_overlay(decoded, pixels, keep_px, width)).cpu()
        if self.vae is None:
            samples = torch.where(keep_px.cpu(), pixels.cpu(), samples)
        return Text2ImageOutput(tensor_to_pil(samples), samples, result.samples.float().cpu(), result.nfe)

    def _initial_latents(self, latents: Tensor | None, noise: NoiseSource, shape: tuple[int, ...], batch: int) -> Tensor:
        if latents is None:
            return noise.randn(shape, device=self.device)
        expected = (batch, *shape)
        if not isinstance(latents, Tensor) or tuple(latents.shape) != expected:
            got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise UserError(f"latents has shape {got}, expected {expected} (batch, channels, height / {self.factor}, "
                            f"width / {self.factor}); draw it with torch.randn{expected}")
        return latents.to(device=self.device, dtype=torch.float32)

    def in_batches(self, num_images: int, batch_size: int, *, prompt: str | Sequence[str], seed: int = 0,
                   **kwargs: Any) -> Text2ImageOutput:
        """``num_images`` images, ``batch_size`` per call; image i uses ``torch.Generator().manual_seed(seed + i)``
        whatever the batch size. ``prompt`` (and ``negative_prompt``) may be one or one per image."""
        if num_images < 1:
            raise UserError(f"num_images must be >= 1, got {num_images}")
        prompts = [prompt] * num_images if isinstance(prompt, str) else list(prompt)

        def call(n: int, first_seed: int, rows: dict[str, Any]) -> Text2ImageOutput:
            generators = [torch.Generator().manual_seed(first_seed + i) for i in range(n)]
            return self(generator=generators, **rows)

        parts = run_in_batches(call, num_images, batch_size, seed, {"prompt": prompts, **kwargs})
        pil = isinstance(parts[0].images, list)
        images: Any = [im for p in parts for im in p.images] if pil else torch.cat([p.images for p in parts])
        samples, final = torch.cat([p.samples for p in parts]), torch.cat([p.latents for p in parts])
        return Text2ImageOutput(images, samples, final, parts[0].nfe)


def _prompts_for_pictures(prompt: Any, negative_prompt: Any, n: int) -> tuple[list[str], list[str] | None]:
    """One prompt (and negative) per edited picture: a single prompt serves all ``n``."""
    prompts, negatives = _per_image_prompts(prompt, negative_prompt, 1)
    if len(prompts) == 1 and n > 1:
        prompts, negatives = prompts * n, (negatives * n if negatives else None)
    if len(prompts) != n:
        raise UserError(f"got {len(prompts)} prompts for {n} images; pass one prompt or one per image")
    return prompts, negatives


def _per_image_prompts(prompt: Any, negative_prompt: Any, per_prompt: int) -> tuple[list[str], list[str] | None]:
    """One prompt (and negative prompt) per image: each prompt repeated ``per_prompt`` times, in order."""
    if isinstance(per_prompt, bool) or not isinstance(per_prompt, int) or per_prompt < 1:
        raise UserError(f"num_images_per_prompt must be an integer >= 1, got {per_prompt!r}")
    prompts = check_prompts([prompt] if isinstance(prompt, str) else prompt)
    if negative_prompt is None:
        return [p for p in prompts for _ in range(per_prompt)], None
    negatives = check_prompts([negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt)
    if len(negatives) != len(prompts):
        raise UserError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts; pass one or one per prompt")
    return [p for p in prompts for _ in range(per_prompt)], [n for n in negatives for _ in range(per_prompt)]
