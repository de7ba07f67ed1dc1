"""Configuration of the difflab UNet: a validated, JSON-friendly dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from difflab.errors import UserError
from difflab.io.configs import JsonConfig

# Named shapes for 32x32 inputs (use with UNetConfig.preset). See docs/benchmarks_unet.md.
PRESETS: dict[str, dict[str, Any]] = {
    # 6.47M parameters, 0.88 GFLOP per 32x32 image: same size as a diffusers UNet2DModel with
    # block_out_channels=(64, 128, 128), layers_per_block=2, at under a third of its FLOPs. Most
    # parameters sit at 8x8 and 4x4, where a conv weight costs 16-64x fewer FLOPs than at 32x32.
    "small32": {
        "base_channels": 48,
        "channel_mults": (1, 1, 2, 3),
        "num_res_blocks": (1, 2, 2, 2),
        "attention_levels": (2, 3),
    },
    # 1.16M parameters, 0.44 GFLOP per image: learns simple coloured shapes on a 2-core CPU.
    "tiny32": {
        "base_channels": 32,
        "channel_mults": (1, 2, 2),
        "num_res_blocks": 1,
        "attention_levels": (2,),
        "norm_groups": 8,
    },
    # The first level works on 16x16 maps of 2x2 patches, with x, y coordinate channels: 6.03M parameters and
    # 0.51 GFLOP per image as the demo's text-to-image model (tiny32 with text: 1.44M, 0.45 GFLOP), 4.83M as
    # an unconditional grey MNIST model. Issue 12's layout for 32x32 images (docs/benchmarks.md, section 2)
    # and the default for them (:func:`default_layout`).
    "patch32": {
        "patch_size": 2,
        "base_channels": 64,
        "channel_mults": (1, 2, 2),
        "num_res_blocks": 1,
        "attention_levels": (1, 2),
        "head_channels": 32,
        "norm_groups": 16,
        "coordinate_channels": True,
    },
}

# The fields that make a layout: a model config that sets any of them has chosen its own (default_layout gives way).
LAYOUT_FIELDS: tuple[str, ...] = ("patch_size", "base_channels", "channel_mults", "num_res_blocks", "attention_levels",
                                  "head_channels", "norm_groups", "mid_attention", "dims", "downsample_axes")


def default_layout(sample_shape: tuple[int, ...], text: bool = False) -> dict[str, Any]:
    """The UNet layout for samples of ``sample_shape`` (C, *spatial) when a config names none.

    32x32 images get the ``patch32`` preset (with ``token_pooling`` when conditioned on text): the layout that
    issue 12's ablation chose on captioned shapes (docs/benchmarks.md, section 2) and that the time-to-quality
    benchmark then scored on MNIST (section 9). Other shapes, where no layout was measured, get
    :class:`UNetConfig`'s field defaults (an empty dict).
    """
    if len(sample_shape) != 3 or tuple(sample_shape[1:]) != (32, 32):
        return {}
    return {**PRESETS["patch32"], **({"token_pooling": True} if text else {})}


@dataclass
class EncoderConfig(JsonConfig):
    """The encoder fields shared by :class:`UNetConfig` and the noise-aware classifier's config.

    Attributes:
        in_channels: channels of the input (3 for RGB).
        base_channels: channels at full resolution; level ``i`` has ``base_channels * channel_mults[i]``.
        channel_mults: one multiplier per resolution level; each level after the first halves the
            downsampled axes (all of them unless ``downsample_axes`` says otherwise).
        num_res_blocks: residual blocks per encoder level. An int for all levels or one per level.
        attention_levels: indices into ``channel_mults`` of the levels with self-attention.
        head_channels: channels per attention head.
        dropout: dropout rate inside residual blocks (active in training mode only).
        norm_groups: GroupNorm groups, clipped to a divisor of each channel count.
        mid_attention: self-attention in the middle block.
        dims: spatial dims of the data: 1 (B, C, L), 2 (B, C, H, W) or 3 (B, C, T, H, W).
        downsample_axes: one bool per spatial axis, whether the levels halve it; ``None`` means all axes
            (e.g. ``(False, True, True)`` keeps the time axis of a video at full length).
    """

    in_channels: int = 3
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int | tuple[int, ...] = 2
    attention_levels: tuple[int, ...] = (1,)
    head_channels: int = 32
    dropout: float = 0.0
    norm_groups: int = 32
    mid_attention: bool = True
    dims: int = 2
    downsample_axes: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        self.attention_levels = tuple(int(i) for i in self.attention_levels)
        if not isinstance(self.num_res_blocks, int):
            self.num_res_blocks = tuple(int(n) for n in self.num_res_blocks)
        if self.downsample_axes is not None:
            self.downsample_axes = tuple(bool(a) for a in self.downsample_axes)
        self._validate()

    def _validate(self) -> None:
        for name in ("in_channels", "base_channels", "head_channels", "norm_groups"):
            _require_positive(name, getattr(self, name))
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise UserError(
                f"channel_mults={self.channel_mults} is invalid; "
                "give one or more positive ints, e.g. (1, 2, 2)"
            )
        levels = len(self.channel_mults)
        blocks = self.res_blocks_per_level()
        if len(blocks) != levels or min(blocks) < 1:
            raise UserError(
                f"num_res_blocks={self.num_res_blocks} is invalid; give an int >= 1 or {levels} ints >= 1 "
                f"(one per entry of channel_mults)"
            )
        bad = [i for i in self.attention_levels if not 0 <= i < levels]
        if bad:
            raise UserError(
                f"attention_levels contains {bad}; valid level indices are 0..{levels - 1} "
                f"(positions in channel_mults={self.channel_mults})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout={self.dropout} is invalid; use a rate in [0, 1)")
        if self.dims not in (1, 2, 3) or isinstance(self.dims, bool):
            raise UserError(f"dims={self.dims!r} is invalid; use 1 (sequences), 2 (images) or 3 (videos, volumes)")
        if self.downsample_axes is not None and len(self.downsample_axes) != self.dims:
            raise UserError(f"downsample_axes={self.downsample_axes} needs one bool per spatial axis ({self.dims}), "
                            "e.g. (False, True, True) for (T, H, W)")

    def res_blocks_per_level(self) -> tuple[int, ...]:
        """``num_res_blocks`` expanded to one count per level."""
        if isinstance(self.num_res_blocks, int):
            return (self.num_res_blocks,) * len(self.channel_mults)
        return tuple(self.num_res_blocks)

    def resolved_downsample_axes(self) -> tuple[bool, ...]:
        """``downsample_axes``, or all ``True`` when it is ``None``."""
        return (True,) * self.dims if self.downsample_axes is None else self.downsample_axes


@dataclass
class UNetConfig(EncoderConfig):
    """Shape of a :class:`~difflab.nets.unet.UNet`: the :class:`EncoderConfig` fields, and

    Attributes:
        out_channels: channels of the output; ``None`` means ``in_channels`` (use ``2 * in_channels``
            for a learned variance, Nichol & Dhariwal 2021).
        num_res_blocks: (as in the encoder) the decoder has one more per level to consume the
            downsampling skip.
        num_classes: if set, a class embedding (with one extra learned "null" label, index
            ``num_classes``) is added to the time embedding.
        context_dim: if set, every attention level (and the middle) gets cross-attention to
            ``context`` tokens of this width after its self-attention.
        pooled_context_dim: if set, a pooled text vector of this width is projected and added to
            the time embedding.
        gradient_checkpointing: recompute block activations in backward to save memory.
        concat_channels: channels of a ``concat`` condition joined to x before ``conv_in`` (SR3, Saharia
            et al. 2021); ``in_channels`` stays the channels of x. 0: none.
        concat_resize: how a smaller ``concat`` is upsampled to x's size: bilinear (linear per axis), nearest or bicubic.
        aug_embedding: embed the concat condition's augmentation level ``aug_level`` like the timestep and add
            it to the time embedding (noise-conditioning augmentation, Ho et al. 2021).
        patch_size: fold ``patch_size``-wide patches of the downsampled axes into channels before ``conv_in``
            and unfold them after ``conv_out`` (:mod:`difflab.nets.patches`): the first level runs at
            ``1 / patch_size`` of the resolution, so a 32x32 image costs like a 16x16 one at ``patch_size=2``.
        coordinate_channels: append every position's coordinates along each spatial axis, in [-1, 1], as input
            channels (CoordConv, Liu et al. 2018): the first layer knows absolute position, which convolutions
            otherwise infer only from the zero padding.
        token_pooling: add the masked mean of a learned two-layer MLP of the ``context`` tokens to the time
            embedding (Deep Sets pooling, Zaheer et al. 2017; needs ``context_dim``): every word reaches every
            block at first order, before cross-attention has learned where to look.
    """

    out_channels: int | None = None
    num_classes: int | None = None
    context_dim: int | None = None
    pooled_context_dim: int | None = None
    gradient_checkpointing: bool = False
    concat_channels: int = 0
    concat_resize: str = "bilinear"
    aug_embedding: bool = False
    patch_size: int = 1
    coordinate_channels: bool = False
    token_pooling: bool = False

    def _validate(self) -> None:
        super()._validate()
        _require_positive("patch_size", self.patch_size)
        if self.token_pooling and self.context_dim is None:
            raise UserError("token_pooling=True needs context tokens; set context_dim (text conditioning) or drop token_pooling")
        if isinstance(self.concat_channels, bool) or not isinstance(self.concat_channels, int) or self.concat_channels < 0:
            raise UserError(f"concat_channels={self.concat_channels!r} is invalid; use an int >= 0 (0: no concat condition)")
        if self.concat_resize not in ("bilinear", "nearest", "bicubic"):
            raise UserError(f"concat_resize={self.concat_resize!r} is invalid; use bilinear, nearest or bicubic")
        for name in ("out_channels", "num_classes", "context_dim", "pooled_context_dim"):
            if getattr(self, name) is not None:
                _require_positive(name, getattr(self, name))

    @property
    def resolved_out_channels(self) -> int:
        """``out_channels``, or ``in_channels`` when it is ``None``."""
        return self.in_channels if self.out_channels is None else self.out_channels

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> UNetConfig:
        """A named configuration from ``PRESETS`` (e.g. ``"small32"``), with fields overridden."""
        if name not in PRESETS:
            raise UserError(f"unknown UNet preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def _require_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name}={value!r} is invalid; use a positive integer")
