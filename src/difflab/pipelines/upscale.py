"""UpscalePipeline: SR3 super-resolution (Saharia et al. 2021) with a model trained by
``difflab train --task super-resolution --scale S``: sample x at S times the input's size, conditioned on the
input (upsampled bicubically inside the network and concatenated to x_t), optionally noise-augmented at a
fixed ``aug_level`` (CDM, Ho et al. 2021).

Inputs larger than the model's training low-resolution size are refused, not tiled: the network saw only
that extent of context, and seams between tiles would need their own treatment.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from difflab.errors import UserError
from difflab.pipelines.diffusion import PipelineOutput, eta_option, seeded_noise
from difflab.pipelines.edit import ImageInputPipeline
from difflab.samplers import sample


class UpscalePipeline(ImageInputPipeline):
    """Upscale pictures by the factor the model was trained for (``pipe.scale``)."""

    @property
    def scale(self) -> int:
        scale = self.extra_config.get("scale")
        if self.extra_config.get("task") != "super-resolution" or not scale:
            raise UserError("this model was not trained for super-resolution; train one with "
                            "`difflab train --task super-resolution --scale 4` (or load it with DiffusionPipeline)")
        return int(scale)

    @torch.no_grad()
    def __call__(
        self,
        image: Any,
        num_inference_steps: int = 50,
        sampler: str | None = None,
        eta: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        seed: int | None = None,
        progress: bool = True,
        *,
        scale: int | None = None,
        aug_level: float = 0.0,
        class_labels: Any = None,
        prompt: Any = None,
        negative_prompt: Any = None,
        guidance_scale: float = 1.0,
        **sampler_options: Any,
    ) -> PipelineOutput:
        """``image``: low-resolution pictures (paths, PIL images or (B, C, h, w) tensors in [-1, 1]); the output is
        (B, C, scale h, scale w). ``scale``, if given, must be the trained one. ``aug_level`` in [0, 1]: the
        augmentation of the input at sampling (0: clean; a model trained with augmentation accepts > 0)."""
        trained = self.scale
        if scale is not None and scale != trained:
            raise UserError(f"this model upscales by {trained}, not {scale}; train a --scale {scale} model for that factor")
        self._check_steps(num_inference_steps)
        low = self._inputs_unchecked(image).to(self.device)
        h, w = low.shape[-2:]
        max_h, max_w = (n // trained for n in self.sample_shape[1:])
        if h > max_h or w > max_w:
            raise UserError(f"the input is {w}x{h} pixels, larger than the {max_w}x{max_h} inputs this model was trained on; "
                            f"crop or downsize it to at most {max_w}x{max_h} (the pipeline does not tile)")
        shape = (self.sample_shape[0], h * trained, w * trained)
        factor = getattr(self.unet, "downsample_factor", 1)
        if shape[1] % factor or shape[2] % factor:
            raise UserError(f"the output would be {shape[2]}x{shape[1]} pixels, which this network cannot take (sides must be "
                            f"multiples of {factor}); give an input whose sides are multiples of {max(1, factor // trained)}")
        name = sampler or self.sampler
        sampler_options.update(eta_option(name, eta))
        noise = seeded_noise(low.shape[0], seed, generator)
        denoiser = self.denoiser(low.shape[0], class_labels, prompt, negative_prompt, guidance_scale, sampler=name,
                                 concat={"low_res": low}, aug_level=aug_level, noise=noise)
        x_T = denoiser.space.noise(shape, noise, device=self.device)
        out = sample(denoiser, x_T, sampler=name, steps=num_inference_steps, generator=noise, progress=progress, **sampler_options)
        return self._output(out.samples, out.nfe)
