"""Editing pipelines over a trained model folder: InpaintPipeline (RePaint or replacement, and outpainting) and
Img2ImgPipeline (SDEdit). Thin: they turn pictures and PNG masks into tensors, build the (guided) denoiser as
:class:`DiffusionPipeline` does, and call :mod:`difflab.editing`.

Masks follow diffusers: white (>= 128 on the grey value) = fill, black = keep. For a latent model the
editing runs on latents (a latent cell is known when every pixel under it is known), and the decoded result is
overlaid on the input in pixel space: known pixels are copied exactly, and the generated pixels within
``seam_width`` pixels of the known region are blended towards the decoded input, with the weight of the decoded
input falling linearly from 1 at the boundary to 0 at ``seam_width`` pixels into the hole (:func:`seam_overlay`).

>>> pipe = InpaintPipeline.from_pretrained("runs/shapes")                        # doctest: +SKIP
>>> out = pipe(image="in.png", mask_image="mask.png", num_inference_steps=250, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from difflab.editing import inpaint, repaint, sdedit
from difflab.errors import UserError
from difflab.modalities import get_modality
from difflab.pipelines.diffusion import DiffusionPipeline, PipelineOutput, decode_latents, eta_option, seeded_noise
from difflab.samplers import sample

INPAINT_METHODS = ("repaint", "replacement", "trained")
SEAM_WIDTH = 4  # pixels of the blended seam of latent inpainting


def load_image_tensor(image: Any, channels: int) -> Tensor:
    """A path, PIL image, list of them, or a tensor ((C, H, W) or (B, C, H, W) in [-1, 1]) as a (B, C, H, W)
    float tensor in [-1, 1] with ``channels`` channels (1: grey, 3: RGB)."""
    if isinstance(image, Tensor):
        x = image[None] if image.dim() == 3 else image
        if x.dim() != 4 or x.shape[1] != channels:
            raise UserError(f"image tensor has shape {tuple(image.shape)}; expected (B, {channels}, H, W) in [-1, 1]")
        return x.float()
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    arrays = []
    for item in images:
        pil = _open(item)
        pil = pil.convert("L" if channels == 1 else "RGB")
        a = np.asarray(pil, dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    if len({a.shape for a in arrays}) > 1:
        raise UserError(f"the images differ in size ({sorted({a.shape[1:] for a in arrays})}); give images of one size")
    return torch.from_numpy(np.stack(arrays)).float() / 127.5 - 1.0


def load_keep_mask(mask_image: Any, size: tuple[int, int]) -> Tensor:
    """A PNG / PIL mask (white = fill), a list of them, or a tensor (1 = fill) as a bool "keep" tensor
    (B or 1, 1, H, W); its size must be the image's ``size`` (H, W)."""
    if isinstance(mask_image, Tensor):
        fill = mask_image.float()
        fill = fill.reshape(1, 1, *fill.shape) if fill.dim() == 2 else (fill[:, None] if fill.dim() == 3 else fill)
        fill = fill > 0.5
    else:
        masks = list(mask_image) if isinstance(mask_image, (list, tuple)) else [mask_image]
        fill = torch.stack([torch.from_numpy(np.asarray(_open(m).convert("L")) >= 128)[None] for m in masks])
    if tuple(fill.shape[-2:]) != tuple(size):
        raise UserError(f"the mask is {fill.shape[-1]}x{fill.shape[-2]} pixels but the image is {size[1]}x{size[0]}; "
                        "give a mask of the image's size (white = fill, black = keep)")
    return ~fill


def _open(item: Any) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    path = Path(item)
    if not path.is_file():
        raise UserError(f"image file {path} does not exist; pass an existing PNG or JPEG")
    try:
        with Image.open(path) as pil:
            return pil.copy()
    except OSError:
        raise UserError(f"{path} is not an image Pillow can read; pass a PNG or JPEG") from None


def latent_keep(keep: Tensor, factor: int) -> Tensor:
    """The latent cells whose ``factor x factor`` pixels are all known (a min-pool of the pixel ``keep`` mask)."""
    return -F.max_pool2d(-keep.float(), factor) > 0.5


def seam_overlay(generated: Tensor, known: Tensor, keep: Tensor, width: int = SEAM_WIDTH,
                 reference: Tensor | None = None) -> Tensor:
    """``known`` where ``keep``; elsewhere ``generated``, blended within ``width`` pixels of the known region
    towards ``reference`` (default ``known``) with weight max(0, 1 - d / width), d >= 1 the pixel's Euclidean
    distance to the nearest known pixel. Known pixels are copied, so they equal ``known`` exactly."""
    from scipy.ndimage import distance_transform_edt

    keep = keep.expand(known.shape[0], 1, *known.shape[2:])
    out = torch.where(keep, known, generated)
    if width <= 0:
        return out
    reference = known if reference is None else reference
    weights = []
    for k in keep[:, 0].cpu().numpy():
        d = distance_transform_edt(~k) if k.any() else np.full(k.shape, np.inf)
        weights.append(np.clip(1.0 - d / width, 0.0, 1.0) * ~k)
    w = torch.from_numpy(np.stack(weights)[:, None]).to(out)
    return torch.where(keep, known, w * reference + (1 - w) * generated)


class ImageInputPipeline(DiffusionPipeline):
    """Shared steps of the pipelines that take pictures (editing, upscaling): inputs to the model's space, the
    guided denoiser, the output."""

    def _inputs_unchecked(self, image: Any) -> Tensor:
        channels = self.vae.config.in_channels if self.vae is not None else self.sample_shape[0]
        return load_image_tensor(image, channels)

    def _inputs(self, image: Any) -> Tensor:
        x = self._inputs_unchecked(image).to(self.device)
        f = (self.vae.downsample_factor if self.vae is not None else 1) * getattr(self.unet, "downsample_factor", 1)
        h, w = x.shape[-2:]
        if h % f or w % f:
            def near(s: int) -> str:
                return " or ".join(str(v) for v in sorted({max(f, s // f * f), (s // f + 1) * f}))
            raise UserError(f"the image is {w}x{h} pixels, but this model needs sides divisible by {f}; "
                            f"resize or crop it to width {near(w)} and height {near(h)}")
        return x

    def _encode(self, x: Tensor) -> Tensor:
        return x if self.vae is None else self.vae.encode(x).mean * self.vae.scaling_factor

    def _output(self, final: Tensor, nfe: int) -> PipelineOutput:
        modality = get_modality(self.modality)
        samples = modality.finalize(final).float().cpu()
        return PipelineOutput(images=modality.to_media(samples), samples=samples, nfe=nfe)


class InpaintPipeline(ImageInputPipeline):
    """Fill the white part of ``mask_image`` in ``image`` with any trained model (no retraining)."""

    @property
    def trained_for_inpainting(self) -> bool:
        """Whether the model was trained with ``--task inpaint`` (conditioned on masked pictures)."""
        return self.conditioner.concat is not None and self.conditioner.concat.masks is not None

    @property
    def default_method(self) -> str:
        return "trained" if self.trained_for_inpainting else "repaint"

    @torch.no_grad()
    def __call__(
        self,
        image: Any,
        mask_image: Any,
        num_inference_steps: int = 250,
        method: str | None = None,
        jump: int = 10,
        resample: int = 10,
        sampler: str | None = None,
        eta: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        seed: int | None = None,
        progress: bool = True,
        *,
        class_labels: Any = None,
        prompt: Any = None,
        negative_prompt: Any = None,
        guidance_scale: float = 1.0,
        seam_width: int = SEAM_WIDTH,
        **sampler_options: Any,
    ) -> PipelineOutput:
        """RePaint (``method="repaint"``, Lugmayr et al. 2022: ``jump``, ``resample``; sampler ddpm or ddim),
        replacement (``method="replacement"``, any sampler) or, for a model trained with ``--task inpaint``, plain
        sampling conditioned on the masked picture (``method="trained"``, Palette, Saharia et al. 2022; any
        sampler, default the model's), over ``num_inference_steps`` steps. ``method=None``: "trained" for an
        inpainting model, else "repaint". Every image of ``image`` is one sample; ``mask_image`` is one mask for
        all or one per image. The output's known pixels equal the input's (latent models: see the module
        docstring for the seam). An inpainting model is conditioned on the masked picture with every method."""
        concat, trained = self.conditioner.concat, self.trained_for_inpainting
        method = method or self.default_method
        if method not in INPAINT_METHODS:
            raise UserError(f"unknown inpainting method {method!r}; use {', '.join(INPAINT_METHODS)}")
        if method == "trained" and not trained:
            raise UserError("method 'trained' needs a model trained with --task inpaint; use repaint or replacement with this one")
        self._check_steps(num_inference_steps)
        pixels = self._inputs(image)
        keep_px = load_keep_mask(mask_image, tuple(pixels.shape[-2:])).to(self.device)
        batch = pixels.shape[0]
        known = self._encode(pixels)
        keep = keep_px
        if self.vae is not None:
            keep = latent_keep(keep_px, self.vae.downsample_factor)
        name = sampler or (self.sampler if method == "trained" else "ddpm")  # ddpm: the exact fit of RePaint and replacement
        sampler_options.update(eta_option(name, eta))
        noise = seeded_noise(batch, seed, generator)
        if trained and self.vae is not None:
            raise UserError("inpainting models are trained on pixels in this version; this one has an autoencoder")
        condition = {concat.key: concat.masked_input(known, keep)} if trained else None
        denoiser = self.denoiser(batch, class_labels, prompt, negative_prompt, guidance_scale, sampler=name, noise=noise,
                                 concat=condition)
        if method == "trained":
            x_T = denoiser.space.noise(known.shape[1:], noise, device=self.device)
            out = sample(denoiser, x_T, sampler=name, steps=num_inference_steps, generator=noise, progress=progress,
                         **sampler_options)
            out = type(out)(torch.where(keep, known, out.samples), out.nfe)
        elif method == "repaint":
            out = repaint(denoiser, known, keep, num_inference_steps, jump, resample, generator=noise, sampler=name,
                          progress=progress, **sampler_options)
        else:
            out = inpaint(denoiser, known, keep, name, num_inference_steps, generator=noise, progress=progress,
                          **sampler_options)
        final = out.samples
        if self.vae is not None:
            decoded = decode_latents(self.vae, final).clamp(-1, 1)
            final = seam_overlay(decoded, pixels, keep_px, seam_width)
        return self._output(final, out.nfe)

    def outpaint(self, image: Any, pad: Sequence[int], fill: float = 0.0, tile: bool = False, **kwargs: Any) -> PipelineOutput:
        """Extend ``image`` by ``pad`` = (left, top, right, bottom) pixels and fill the new border (any keyword
        argument of :meth:`__call__`). The new canvas must suit the model (sides divisible by its factor).

        ``tile=True`` extends by repeated windows of the model's training size instead, each side in turn (right,
        left, bottom, top): every window keeps the canvas's outer part it overlaps as known context and fills at
        most half a window of new pixels, so a model trained at 32x32 can grow a 32-high strip to any width. The
        side across the extension must equal the model's training size."""
        pixels = self._inputs_unchecked(image)
        left, top, right, bottom = check_pad(pad)
        if tile:
            return self._outpaint_tiled(pixels, (left, top, right, bottom), fill, kwargs)
        b, c, h, w = pixels.shape
        canvas = torch.full((b, c, h + top + bottom, w + left + right), fill, dtype=pixels.dtype)
        canvas[..., top:top + h, left:left + w] = pixels
        mask = torch.ones(canvas.shape[-2:], dtype=torch.bool)
        mask[top:top + h, left:left + w] = False
        return self(canvas, mask, **kwargs)

    def _outpaint_tiled(self, canvas: Tensor, pad: tuple[int, int, int, int], fill: float,
                        kwargs: dict[str, Any]) -> PipelineOutput:
        f = self.vae.downsample_factor if self.vae is not None else 1
        window_h, window_w = (n * f for n in self.sample_shape[1:])
        nfe = 0
        for side, amount in zip(("right", "left", "bottom", "top"), (pad[2], pad[0], pad[3], pad[1])):
            axis = -1 if side in ("right", "left") else -2
            window, across = (window_w, window_h) if axis == -1 else (window_h, window_w)
            if amount and canvas.shape[2 if axis == -1 else 3] != across:
                raise UserError(f"tiled outpainting to the {side} needs the picture's other side to be the model's "
                                f"{across} pixels, got {canvas.shape[2 if axis == -1 else 3]}; resize it first")
            while amount > 0:
                n = min(window // 2, amount)
                keep_n = window - n
                if canvas.shape[axis] < keep_n:
                    raise UserError(f"tiled outpainting needs a picture at least {keep_n} pixels along the extension, "
                                    f"got {canvas.shape[axis]}")
                context = canvas.narrow(axis, canvas.shape[axis] - keep_n, keep_n) if side in ("right", "bottom") \
                    else canvas.narrow(axis, 0, keep_n)
                new = torch.full_like(context.narrow(axis, 0, n), fill)
                parts = (context, new) if side in ("right", "bottom") else (new, context)
                mask = torch.cat([torch.zeros_like(p[0, :1], dtype=torch.bool) if p is context else
                                  torch.ones_like(p[0, :1], dtype=torch.bool) for p in parts], dim=axis)[0]
                out = self(torch.cat(parts, dim=axis), mask, **kwargs)
                nfe += out.nfe
                made = out.samples.narrow(axis, keep_n, n) if side in ("right", "bottom") else out.samples.narrow(axis, 0, n)
                canvas = torch.cat((canvas, made) if side in ("right", "bottom") else (made, canvas), dim=axis)
                amount -= n
        return self._output(canvas, nfe)

def check_pad(pad: Sequence[int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) from 1, 2 or 4 non-negative ints, as CSS gives a border (at least one > 0)."""
    values = [int(p) for p in pad]
    if len(values) not in (1, 2, 4) or min(values) < 0 or max(values) == 0:
        raise UserError(f"pad={list(pad)} is invalid; give ALL, or H,V, or L,T,R,B non-negative pixels, at least one > 0")
    if len(values) == 1:
        values *= 4
    elif len(values) == 2:
        values = [values[0], values[1], values[0], values[1]]
    return values[0], values[1], values[2], values[3]


class Img2ImgPipeline(ImageInputPipeline):
    """SDEdit (Meng et al. 2022): noise ``image`` to ``strength`` and denoise it, with any sampler and condition."""

    @torch.no_grad()
    def __call__(
        self,
        image: Any,
        strength: float = 0.6,
        num_inference_steps: int = 50,
        sampler: str | None = None,
        eta: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        seed: int | None = None,
        progress: bool = True,
        *,
        class_labels: Any = None,
        prompt: Any = None,
        negative_prompt: Any = None,
        guidance_scale: float = 1.0,
        **sampler_options: Any,
    ) -> PipelineOutput:
        """Runs the last round(strength * num_inference_steps) steps from the noised input
        (:func:`difflab.editing.sdedit`); ``strength=1`` is plain generation from the same seeds."""
        self._check_steps(num_inference_steps)
        pixels = self._inputs(image)
        batch = pixels.shape[0]
        name = sampler or self.sampler
        sampler_options.update(eta_option(name, eta))
        noise = seeded_noise(batch, seed, generator)
        denoiser = self.denoiser(batch, class_labels, prompt, negative_prompt, guidance_scale, sampler=name, noise=noise)
        out = sdedit(denoiser, self._encode(pixels), strength, name, num_inference_steps, generator=noise,
                     progress=progress, **sampler_options)
        final = out.samples if self.vae is None else decode_latents(self.vae, out.samples)
        return self._output(final, out.nfe)
