"""Concatenation conditioning: an image-like condition (a low-res image, a mask, a first frame) joined to
the network input along channels, with noise-conditioning augmentation.

SR3 (Saharia et al. 2021) concatenates the upsampled low-res image to x_t; the UNet upsamples it to x's
size (``resize``). Cascaded Diffusion Models (Ho et al. 2021, sec. 3.2 / 4.3) corrupt it in training with
the forward process at a random level, ``z_s = alpha_s c + sigma_s eps`` with ``s ~ U[0, noise_aug_max]``,
and give ``s`` to the network; at sampling one fixed ``s`` is chosen (0: the clean condition).

Levels are fractions of the augmentation schedule: ``s`` in [0, 1] is the time index ``t_s = s T - 1``
(``s = 0`` is clean, ``t = -1``; ``s = 1`` the noisiest step ``T - 1``). The network receives
``AUG_EMBED_SCALE * s``, the unit of the timestep embedding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from difflab.conditioning.base import Condition, rows_where
from difflab.conditioning.dropout import drop_mask
from difflab.data.masks import check_mask_kinds, random_fill_masks
from difflab.errors import UserError
from difflab.noise import NoiseSource
from difflab.schedules import NoiseSchedule, broadcast_to

AUG_EMBED_SCALE = 1000.0
RESIZE_MODES = ("bilinear", "nearest", "bicubic")


class ConcatCondition(Condition):
    """The batch entry ``key`` (B, ``channels``, *low-res spatial) concatenated to the network input.

    ``noise_aug_max`` in [0, 1]: the largest augmentation level (a fraction of ``schedule``, see the module
    docstring); 0 switches augmentation (and the network's level embedding) off. ``dropout``: probability
    of the null (all-zero) condition in training, drawn on its own (default 0: always conditioned).
    ``resize``: how the UNet upsamples the condition to x's size (bilinear means (bi/tri)linear by dims).
    ``schedule``: the augmentation's forward process (a NoiseSchedule, kind name or config; default linear, T=1000).
    ``masks``: an inpainting model's condition (Palette, Saharia et al. 2022): the items' ``key`` is the clean
    picture (``channels - 1`` channels), and training draws a random fill mask per row of these kinds
    (:mod:`difflab.data.masks`) and conditions on :meth:`masked_input` (the picture zeroed where it is to be
    filled, plus the keep mask as the last channel). At sampling the caller passes that masked input.
    """

    kind = "concat"

    def __init__(self, key: str = "low_res", channels: int = 3, noise_aug_max: float = 0.0, dropout: float = 0.0,
                 resize: str = "bilinear", schedule: Any = "linear", masks: Any = None) -> None:
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise UserError(f"ConcatCondition channels={channels!r} must be a positive int (the condition's channels)")
        if not 0.0 <= float(noise_aug_max) <= 1.0:
            raise UserError(f"noise_aug_max={noise_aug_max!r} must lie in [0, 1] (a fraction of the augmentation "
                            "schedule's T; 0 turns augmentation off)")
        if resize not in RESIZE_MODES:
            raise UserError(f"resize={resize!r} is not one of {', '.join(RESIZE_MODES)}")
        drop_mask(0, dropout)  # validates the rate
        self.key, self.channels, self.resize = key, channels, resize
        self.noise_aug_max, self.dropout = float(noise_aug_max), float(dropout)
        self.schedule = NoiseSchedule.coerce(schedule)
        self.masks = None if masks is None else check_mask_kinds(list(masks))
        if self.masks is not None and channels < 2:
            raise UserError(f"an inpainting condition has the picture's channels plus the mask: channels={channels} is too few")

    @staticmethod
    def masked_input(image: Tensor, keep: Tensor) -> Tensor:
        """(B, C + 1, ...): ``image`` zeroed where ``keep`` is False, then ``keep`` (1 = known) as a channel."""
        keep = keep.to(image.dtype).expand(image.shape[0], 1, *image.shape[2:])
        return torch.cat([image * keep, keep], dim=1)

    @property
    def level_key(self) -> str:
        return f"{self.key}_aug_level"

    @property
    def aug_embedding(self) -> bool:
        return self.noise_aug_max > 0

    def null_value(self, like: Tensor) -> Tensor:
        """The null condition: zeros, one row shaped like ``like``'s rows."""
        return torch.zeros_like(like[:1])

    def corrupt(self, c: Tensor, level: Tensor, noise: Tensor) -> Tensor:
        """``alpha_s c + sigma_s eps`` at levels ``level`` (B,) in [0, 1]: q(z_s | c) of the augmentation schedule."""
        t = level.to(torch.float64) * self.schedule.T - 1.0
        alpha, sigma = broadcast_to(self.schedule.alpha(t), c), broadcast_to(self.schedule.sigma(t), c)
        return (alpha * c.double() + sigma * noise.double()).to(c.dtype)

    def prepare(self, values: Any, drop: Tensor, generator: torch.Generator) -> dict[str, Any]:
        """Augment at ``s ~ U[0, noise_aug_max]`` and drop rows with the condition's own ``dropout``
        (``drop``, the class/text dropout, is not used). Dropped rows get the null condition and level 0."""
        if self.masks is not None:  # inpainting: a fresh random mask per row, from the step's generator
            picture = self._check(values, None, self.channels - 1)
            fill = random_fill_masks(picture.shape[0], *picture.shape[-2:], generator, self.masks)
            c = self.masked_input(picture, ~fill)
        else:
            c = self._check(values, None)
        batch = c.shape[0]
        level = torch.zeros(batch, dtype=torch.float64)
        if self.aug_embedding:
            level = self.noise_aug_max * torch.rand(batch, generator=generator, dtype=torch.float64)
            c = self.corrupt(c, level, torch.randn(c.shape, generator=generator, dtype=c.dtype))
        if self.dropout > 0:
            dropped = drop_mask(batch, self.dropout, generator)
            c, level = rows_where(dropped, self.null_value(c), c), torch.where(dropped, 0.0, level)
        return {self.key: c, self.level_key: level}

    def network_kwargs(self, prepared: dict[str, Any], device: torch.device) -> dict[str, Tensor]:
        kwargs = {"concat": prepared[self.key].to(device)}
        if self.aug_embedding:
            kwargs["aug_level"] = (AUG_EMBED_SCALE * prepared[self.level_key]).float().to(device)
        return kwargs

    def sampling_pair(self, batch: int, value: Any, aug_level: float = 0.0, noise: Any = None,
                      **options: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The (augmented at ``aug_level``) condition in both branches: guidance leaves it as it is.

        ``noise``: a :class:`~difflab.noise.NoiseSource` / generator(s) for the augmentation noise when
        ``aug_level > 0`` (row i from generator i keeps image i independent of the batch)."""
        if value is None:
            raise UserError(f"this model is conditioned on an image {self.key!r} ({self.channels} channels); "
                            f"pass concat={{{self.key!r}: tensor (B, {self.channels}, h, w)}}")
        c = self._check(value, batch)
        if not 0.0 <= float(aug_level) <= 1.0:
            raise UserError(f"aug_level={aug_level!r} must lie in [0, 1] (0: the clean condition)")
        if aug_level > 0 and not self.aug_embedding:
            raise UserError(f"aug_level={aug_level} needs a model trained with noise augmentation "
                            "(noise_aug_max > 0); this one was not, use aug_level=0")
        level = torch.full((batch,), float(aug_level), dtype=torch.float64)
        if aug_level > 0:
            c = self.corrupt(c, level, NoiseSource.from_any(noise, batch).randn(c.shape[1:], dtype=c.dtype))
        kwargs = self.network_kwargs({self.key: c, self.level_key: level}, c.device)
        return kwargs, dict(kwargs)

    def _check(self, value: Any, batch: int | None, channels: int | None = None) -> Tensor:
        c = torch.as_tensor(value)
        channels = self.channels if channels is None else channels
        if not c.is_floating_point() or c.ndim < 3 or c.shape[1] != channels:
            raise UserError(f"condition {self.key!r} has shape {tuple(c.shape)} ({c.dtype}); expected a float "
                            f"tensor (B, {channels}, *spatial)")
        if batch is not None and c.shape[0] == 1:
            c = c.expand(batch, *c.shape[1:])
        if batch is not None and c.shape[0] != batch:
            raise UserError(f"condition {self.key!r} has {c.shape[0]} rows for {batch} images; pass 1 or {batch}")
        return c

    def unet_fields(self) -> dict[str, Any]:
        return {"concat_channels": self.channels, "concat_resize": self.resize, "aug_embedding": self.aug_embedding}

    def to_config(self) -> dict[str, Any]:
        config = {"key": self.key, "channels": self.channels, "noise_aug_max": self.noise_aug_max,
                  "dropout": self.dropout, "resize": self.resize, "schedule": self.schedule.to_config()}
        return config if self.masks is None else {**config, "masks": list(self.masks)}
