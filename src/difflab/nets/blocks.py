"""Convolutional building blocks of the UNet, written for any number of spatial dims.

Every block takes ``dims`` (1 for audio, 2 for images, 3 for video volumes), so the one UNet serves
1-D, 2-D and space-time data; ``Downsample`` / ``Upsample`` may leave some axes (a video's time) alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def conv_nd(dims: int, in_channels: int, out_channels: int, kernel_size: int, **kwargs) -> nn.Module:
    """A ``dims``-D convolution (``nn.Conv1d``/``Conv2d``/``Conv3d``); ``kwargs`` go to the layer."""
    return _CONV[dims](in_channels, out_channels, kernel_size, **kwargs)


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is ``<= limit`` (at least 1)."""
    for d in range(max(1, min(n, limit)), 0, -1):
        if n % d == 0:
            return d
    return 1


def silu(x: Tensor) -> Tensor:
    """SiLU, in place when autograd is off (sampling): saves a large allocation per call.

    Only for freshly made tensors. Under autograd an in-place SiLU would clone its input anyway.
    """
    return F.silu(x, inplace=not torch.is_grad_enabled())


def group_norm(channels: int, max_groups: int, affine: bool = True) -> nn.GroupNorm:
    """GroupNorm (Wu & He 2018) with the group count clipped to a divisor of ``channels``."""
    return nn.GroupNorm(largest_divisor_at_most(channels, max_groups), channels, eps=1e-5, affine=affine)


class ResBlock(nn.Module):
    """Residual block conditioned on an embedding by scale and shift.

    ``h = conv1(silu(norm1(x)))``;
    ``h = conv2(dropout(silu(norm2(h) * (1 + scale) + shift)))`` with ``(scale, shift) = W e``;
    ``out = skip(x) + h``, where ``skip`` is a 1x1 conv when the channel count changes.
    Scale-shift conditioning ("adaptive group norm") follows Nichol & Dhariwal 2021 and
    Dhariwal & Nichol 2021. ``norm2`` has no affine parameters: ``W e``'s bias already gives a
    learned per-channel scale and shift, so they would be redundant.

    The embedding passed to ``forward`` must already be ``silu``-activated (the UNet does this once
    for all blocks). With ``emb_dim=None`` the block is unconditioned (the autoencoder's): ``norm2`` is
    then affine and ``forward`` takes no embedding.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int | None,
        dropout: float = 0.0,
        norm_groups: int = 32,
        dims: int = 2,
    ) -> None:
        super().__init__()
        self.dims = dims
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = conv_nd(dims, in_channels, out_channels, 3, padding=1)
        self.emb_proj = None if emb_dim is None else nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = group_norm(out_channels, norm_groups, affine=emb_dim is None)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv_nd(dims, out_channels, out_channels, 3, padding=1)
        self.skip: nn.Module = (
            nn.Identity() if in_channels == out_channels else conv_nd(dims, in_channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        """``x``: ``(B, C_in, *spatial)``; ``emb``: activated embedding ``(B, emb_dim)`` (None if unconditioned)."""
        h = self.conv1(silu(self.norm1(x)))
        if self.emb_proj is None:
            return self.conv2(self.dropout(silu(self.norm2(h)))).add_(self.skip(x))
        scale_shift = self.emb_proj(emb)
        scale_shift = scale_shift.view(*scale_shift.shape, *([1] * self.dims))
        scale, shift = scale_shift.chunk(2, dim=1)
        h = torch.addcmul(shift, self.norm2(h), scale + 1.0)
        h = self.conv2(self.dropout(silu(h)))
        return h.add_(self.skip(x))


class Downsample(nn.Module):
    """Halve the spatial dims with a learned stride-2 3x3 conv (Ho et al. 2020).

    ``axes``: one bool per spatial axis, whether to halve it (stride 1 on the others); None halves all.
    """

    def __init__(self, channels: int, dims: int = 2, axes: tuple[bool, ...] | None = None) -> None:
        super().__init__()
        stride = 2 if axes is None or all(axes) else tuple(2 if a else 1 for a in axes)
        self.conv = conv_nd(dims, channels, channels, 3, stride=stride, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the spatial dims: nearest-neighbour resize then a 3x3 conv (Ho et al. 2020).

    The conv may also change the width (``out_channels``), so that it already produces the finer
    level's channel count instead of running a wide conv at the finer resolution. ``axes`` as in
    :class:`Downsample`.
    """

    def __init__(self, channels: int, dims: int = 2, out_channels: int | None = None,
                 axes: tuple[bool, ...] | None = None) -> None:
        super().__init__()
        self.scale: float | tuple[float, ...] = (
            2.0 if axes is None or all(axes) else tuple(2.0 if a else 1.0 for a in axes))
        self.conv = conv_nd(dims, channels, out_channels or channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))
