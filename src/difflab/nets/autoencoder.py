"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, sec. 3 and appendix G).

An encoder maps an image ``x`` in [-1, 1] of shape ``(B, C, H, W)`` to a diagonal Gaussian posterior
``q(z | x) = N(mean, diag(exp(logvar)))`` over latents ``(B, latent_channels, H / f, W / f)``, with
``f = 2 ** (len(channel_mults) - 1)``; a decoder maps a latent back to an image. A diffusion model
trains on ``z * scaling_factor`` (``scaling_factor = 1 / std(z)`` over training data, so latents have
unit variance); generated latents are decoded with ``decode(latents / scaling_factor)``.

    encoder: conv_in -> per level [ResBlock x n, Downsample] -> ResBlock, attention, ResBlock
             -> norm, SiLU, conv_out (2 * latent_channels) -> 1x1 conv = (mean, logvar)
    decoder: 1x1 conv -> conv_in -> ResBlock, attention, ResBlock
             -> per level, coarse to fine [ResBlock x (n + 1), Upsample] -> norm, SiLU, conv_out

Example:
    >>> ae = AutoencoderKL(AutoencoderConfig(base_channels=16, norm_groups=8))
    >>> posterior = ae.encode(torch.zeros(2, 3, 16, 16))
    >>> posterior.mean.shape, ae.decode(posterior.mode()).shape
    (torch.Size([2, 4, 4, 4]), torch.Size([2, 3, 16, 16]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from difflab.errors import UserError
from difflab.io.configs import JsonConfig
from difflab.io.model_folder import PretrainedModel
from difflab.io.registry import register_network
from difflab.nets.attention import SelfAttention
from difflab.nets.blocks import Downsample, ResBlock, Upsample, conv_nd, group_norm
from difflab.noise import NoiseSource

LOGVAR_RANGE = (-30.0, 20.0)  # clamp of the log-variance, as in the LDM code, so exp() stays finite
GeneratorLike = torch.Generator | Sequence[torch.Generator] | NoiseSource | None


@dataclass
class AutoencoderConfig(JsonConfig):
    """Shape of an :class:`AutoencoderKL`.

    Attributes:
        in_channels: image channels (3 for RGB).
        base_channels: channels at full resolution; level ``i`` has ``base_channels * channel_mults[i]``.
        channel_mults: one multiplier per level; each level after the first halves H and W, so the
            downsampling factor is ``2 ** (len(channel_mults) - 1)``: (1, 2, 2) gives 4, (1, 2, 2, 4) gives 8.
        num_res_blocks: residual blocks per encoder level (the decoder has one more per level).
        latent_channels: channels of the latent ``z``.
        norm_groups: GroupNorm groups, clipped to a divisor of each channel count.
        mid_attention: single-head self-attention between the two middle residual blocks.
        scaling_factor: ``1 / std`` of the latents over training data (1.0 until computed after training).
    """

    in_channels: int = 3
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    latent_channels: int = 4
    norm_groups: int = 32
    mid_attention: bool = True
    scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.channel_mults, (list, tuple)):
            self.channel_mults = tuple(self.channel_mults)
        for name in ("in_channels", "base_channels", "num_res_blocks", "latent_channels", "norm_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"AutoencoderConfig.{name}={value!r} is invalid; use a positive integer")
        mults = self.channel_mults
        if not isinstance(mults, tuple) or not mults or any(
                isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mults):
            raise UserError(f"AutoencoderConfig.channel_mults={mults!r} is invalid; give one or more positive ints, "
                            "e.g. (1, 2, 2) for 4x or (1, 2, 2, 4) for 8x downsampling")
        if not isinstance(self.mid_attention, bool):
            raise UserError(f"AutoencoderConfig.mid_attention={self.mid_attention!r} is invalid; use true or false")
        check_scaling_factor(self.scaling_factor)
        self.scaling_factor = float(self.scaling_factor)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)


def check_scaling_factor(value: Any) -> float:
    """A finite positive float, else ``UserError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise UserError(f"scaling_factor={value!r} is invalid; use a finite positive number (1 / std of the latents)")
    return float(value)


def check_latent_size(height: int, width: int, factor: int) -> tuple[int, int]:
    """The latent size ``(height // factor, width // factor)``; ``UserError`` naming the nearest valid sizes."""
    bad = [s for s in (height, width) if s < factor or s % factor]
    if bad:
        def near(s: int) -> str:
            low, high = max(factor, s // factor * factor), max(factor, -(-s // factor) * factor)
            return str(low) if low == high else f"{low} or {high}"

        raise UserError(f"image size {height}x{width} is not a multiple of the autoencoder's downsampling factor "
                        f"{factor}; use height {near(height)} and width {near(width)}")
    return height // factor, width // factor


class DiagonalGaussian:
    """``N(mean, diag(exp(logvar)))`` over latents ``(B, C, h, w)``; ``logvar`` is clamped to ``LOGVAR_RANGE``."""

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        self.mean = mean
        self.logvar = logvar.clamp(*LOGVAR_RANGE)

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:
        """Split ``(B, 2C, h, w)`` into mean (first C channels) and log-variance."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: GeneratorLike = None) -> Tensor:
        """``mean + std * eps`` (reparameterisation, Kingma & Welling 2014); ``eps`` from ``generator``
        (one ``torch.Generator`` for the batch, one per sample, a :class:`NoiseSource`, or None)."""
        eps = NoiseSource.from_any(generator, self.mean.shape[0]).like(self.mean)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """``KL(q || N(0, I))`` per sample, ``(B,)``: ``0.5 * sum(mean^2 + var - 1 - logvar)`` over C, h, w."""
        return 0.5 * (self.mean.square() + self.var - 1.0 - self.logvar).flatten(1).sum(1)


def _middle(channels: int, groups: int, attention: bool) -> nn.ModuleList:
    blocks: list[nn.Module] = [ResBlock(channels, channels, None, norm_groups=groups)]
    if attention:
        blocks.append(SelfAttention(channels, head_channels=channels, norm_groups=groups))  # one head, as in LDM
    blocks.append(ResBlock(channels, channels, None, norm_groups=groups))
    return nn.ModuleList(blocks)


def _head(channels: int, out_channels: int, groups: int) -> nn.Sequential:
    return nn.Sequential(group_norm(channels, groups), nn.SiLU(), conv_nd(2, channels, out_channels, 3, padding=1))


class Encoder(nn.Module):
    """Image ``(B, C, H, W)`` -> posterior moments ``(B, 2 * latent_channels, H / f, W / f)``."""

    def __init__(self, c: AutoencoderConfig) -> None:
        super().__init__()
        widths = [c.base_channels * m for m in c.channel_mults]
        self.conv_in = conv_nd(2, c.in_channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(ch, width, None, norm_groups=c.norm_groups))
                ch = width
            if level < len(widths) - 1:
                blocks.append(Downsample(ch))
        self.down = nn.ModuleList(blocks)
        self.mid = _middle(ch, c.norm_groups, c.mid_attention)
        self.head = _head(ch, 2 * c.latent_channels, c.norm_groups)
        self.moments = conv_nd(2, 2 * c.latent_channels, 2 * c.latent_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in [*self.down, *self.mid]:
            h = block(h)
        return self.moments(self.head(h))


class Decoder(nn.Module):
    """Latent ``(B, latent_channels, h, w)`` -> image ``(B, C, h * f, w * f)``."""

    def __init__(self, c: AutoencoderConfig) -> None:
        super().__init__()
        widths = [c.base_channels * m for m in c.channel_mults]
        ch = widths[-1]
        self.latent_in = conv_nd(2, c.latent_channels, c.latent_channels, 1)
        self.conv_in = conv_nd(2, c.latent_channels, ch, 3, padding=1)
        self.mid = _middle(ch, c.norm_groups, c.mid_attention)
        blocks: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResBlock(ch, widths[level], None, norm_groups=c.norm_groups))
                ch = widths[level]
            if level > 0:
                blocks.append(Upsample(ch))
        self.up = nn.ModuleList(blocks)
        self.head = _head(ch, c.in_channels, c.norm_groups)

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight of the final conv: where the adaptive GAN weight of Esser et al. 2021 (eq. 7) is measured."""
        return self.head[-1].weight

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(self.latent_in(z))
        for block in [*self.mid, *self.up]:
            h = block(h)
        return self.head(h)


@register_network
class AutoencoderKL(PretrainedModel, nn.Module):
    """KL autoencoder: ``encode(x) -> DiagonalGaussian``, ``decode(z) -> x``, ``forward(x) -> (x_rec, posterior)``.

    ``scaling_factor`` is part of its config, so ``save_pretrained`` / ``from_pretrained`` keep it.
    """

    config_class = AutoencoderConfig
    description = "an autoencoder"

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @scaling_factor.setter
    def scaling_factor(self, value: float) -> None:
        self.config.scaling_factor = check_scaling_factor(value)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Posterior ``q(z | x)`` of images ``x`` ``(B, in_channels, H, W)`` in [-1, 1] (H, W multiples of f)."""
        c = self.config.in_channels
        if x.dim() != 4 or x.shape[1] != c:
            raise UserError(f"autoencoder input has shape {tuple(x.shape)}; expected (B, {c}, H, W)")
        check_latent_size(x.shape[2], x.shape[3], self.downsample_factor)
        return DiagonalGaussian.from_moments(self.encoder(x))

    def decode(self, z: Tensor) -> Tensor:
        """Image (about [-1, 1], not clamped) of an *unscaled* latent ``z`` ``(B, latent_channels, h, w)``."""
        if z.dim() != 4 or z.shape[1] != self.latent_channels:
            raise UserError(f"latent has shape {tuple(z.shape)}; expected (B, {self.latent_channels}, h, w)")
        return self.decoder(z)

    def forward(self, x: Tensor, generator: GeneratorLike = None) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction of ``x`` from a posterior sample, and the posterior."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior
