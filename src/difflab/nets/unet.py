"""The difflab UNet: an encoder-decoder noise-prediction network with skip connections.

Architecture after Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", appendix B) with the
improvements of Nichol & Dhariwal 2021 and Dhariwal & Nichol 2021 (scale-shift conditioning,
multi-head attention, several resolutions with attention), plus cross-attention to context tokens
(Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"):

    x -> conv_in -> [ResBlock (+Attention)] x n, Downsample   per level   (each output kept as a skip)
      -> ResBlock, Attention, ResBlock                        middle, lowest resolution
      -> [concat skip, ResBlock (+Attention)] x (n + 1), Upsample   per level, reversed
         (the Upsample conv already maps to the finer level's width, so no wide conv runs at the
         finer resolution)
      -> GroupNorm, SiLU, conv_out (initialised to zero, so training starts from a zero output)

Example:
    >>> import torch
    >>> net = UNet(UNetConfig(base_channels=32, channel_mults=(1, 2), attention_levels=(1,)))
    >>> net(torch.randn(2, 3, 16, 16), t=torch.tensor([10.0, 999.0])).shape
    torch.Size([2, 3, 16, 16])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from difflab.errors import UserError
from difflab.io.model_folder import PretrainedModel
from difflab.io.registry import register_network
from difflab.nets.attention import CrossAttention, SelfAttention, check_context
from difflab.nets.blocks import Downsample, ResBlock, Upsample, conv_nd, group_norm, silu
from difflab.nets.embeddings import ClassEmbedding, TimestepEmbedding
from difflab.nets.patches import patchify, unpatchify
from difflab.nets.text_base import masked_mean
from difflab.nets.unet_config import EncoderConfig, UNetConfig

__all__ = ["UNet", "UNetConfig", "UNetStage"]


class UNetStage(nn.Module):
    """One UNet step: a ResBlock, then optional self-attention, then optional cross-attention."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        config: EncoderConfig,
        attention: bool,
        dims: int,
    ) -> None:
        super().__init__()
        c = config
        self.res = ResBlock(in_channels, out_channels, emb_dim, c.dropout, c.norm_groups, dims)
        self.attn = SelfAttention(out_channels, c.head_channels, c.norm_groups) if attention else None
        context_dim = getattr(c, "context_dim", None)  # encoder-only configs (the classifier's) have none
        self.cross = (
            CrossAttention(out_channels, context_dim, c.head_channels, c.norm_groups)
            if attention and context_dim is not None
            else None
        )

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        h = self.res(h, emb)
        if self.attn is not None:
            h = self.attn(h)
        if self.cross is not None and context is not None:
            h = self.cross(h, context, context_mask)
        return h


def build_encoder(config: EncoderConfig, emb_dim: int, dims: int) -> tuple[nn.ModuleList, nn.ModuleList, list[int]]:
    """The encoder half of the UNet: downsampling stages and the middle block.

    Returns ``(down, mid, skips)``; ``skips`` lists the channels of every skip connection in order (the
    last entry is also the middle block's width). Shared by :class:`UNet` and the noise-aware classifier.
    """
    chans = [config.base_channels * m for m in config.channel_mults]

    def stage(cin: int, cout: int, attention: bool) -> UNetStage:
        return UNetStage(cin, cout, emb_dim, config, attention, dims)

    down = nn.ModuleList()
    skips, ch = [chans[0]], chans[0]
    for level, n_blocks in enumerate(config.res_blocks_per_level()):
        for _ in range(n_blocks):
            down.append(stage(ch, chans[level], level in config.attention_levels))
            ch = chans[level]
            skips.append(ch)
        if level < len(chans) - 1:
            down.append(Downsample(ch, dims, config.downsample_axes))
            skips.append(ch)
    mid = nn.ModuleList([stage(ch, ch, config.mid_attention), stage(ch, ch, False)])
    return down, mid, skips


@register_network
class UNet(PretrainedModel, nn.Module):
    """Noise-prediction UNet ``eps_theta(x_t, t, cond)`` for ``config.dims``-D data (images: ``dims=2``).

    ``forward(x, t)`` takes ``x`` of shape ``(B, in_channels, *spatial)`` (``(B, C, L)``, ``(B, C, H, W)``
    or ``(B, C, T, H, W)``) and the discrete timestep index ``t`` (a float in ``0 .. T-1``, fractional
    allowed; scalar or shape ``(B,)``) and returns ``(B, out_channels, *spatial)``. Every downsampled axis
    (all, unless ``config.downsample_axes`` says otherwise) must be divisible by ``2 ** (len(channel_mults) - 1)``.

    Conditioning (each only if enabled in the config):
      * ``class_labels`` ``(B,)`` ints: a learned embedding added to the time embedding. Label
        ``num_classes`` (``self.null_label``) is a learned "no class" label for classifier-free
        guidance; ``class_labels=None`` uses it for the whole batch.
      * ``context`` ``(B, L, context_dim)`` with optional ``context_mask`` ``(B, L)`` (``True`` = attend):
        cross-attention after each self-attention. ``context=None`` skips cross-attention.
      * ``pooled_context`` ``(B, pooled_context_dim)``: projected and added to the time embedding.
      * ``concat`` ``(B, concat_channels, *spatial)``: joined to ``x`` along channels before ``conv_in``,
        first upsampled to x's size if smaller (SR3); only ``x`` counts as ``in_channels``.
      * ``aug_level`` scalar or ``(B,)``: the concat condition's augmentation level, embedded like ``t``
        (``aug_embedding``; None means 0, the clean condition).

    Works with ``model.to(memory_format=torch.channels_last)`` and channels-last inputs.
    """

    config_class = UNetConfig
    description = "a diffusion UNet"

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        dims = config.dims
        chans = [config.base_channels * m for m in config.channel_mults]
        emb_dim = 4 * config.base_channels
        self.time_embed = TimestepEmbedding(config.base_channels, emb_dim)
        self.class_embed = ClassEmbedding(config.num_classes, emb_dim) if config.num_classes else None
        pooled_dim = config.pooled_context_dim
        self.pooled_proj = nn.Linear(pooled_dim, emb_dim) if pooled_dim else None
        self.token_pool = nn.Sequential(nn.Linear(config.context_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)) \
            if config.token_pooling else None
        self.aug_embed = TimestepEmbedding(config.base_channels, emb_dim) if config.aug_embedding else None
        fold = config.patch_size ** sum(config.resolved_downsample_axes())  # channels per input channel after patchify
        inputs = config.in_channels + config.concat_channels + (dims if config.coordinate_channels else 0)
        self.conv_in = conv_nd(dims, inputs * fold, chans[0], 3, padding=1)

        def stage(cin: int, cout: int, attention: bool) -> UNetStage:
            return UNetStage(cin, cout, emb_dim, config, attention, dims)

        self.down, self.mid, skips = build_encoder(config, emb_dim, dims)
        ch = skips[-1]
        self.up = nn.ModuleList()
        for level, n_blocks in reversed(list(enumerate(config.res_blocks_per_level()))):
            for _ in range(n_blocks + 1):
                self.up.append(stage(ch + skips.pop(), chans[level], level in config.attention_levels))
                ch = chans[level]
            if level > 0:
                self.up.append(Upsample(ch, dims, out_channels=chans[level - 1], axes=config.downsample_axes))
                ch = chans[level - 1]
        self.norm_out = group_norm(ch, config.norm_groups)
        self.conv_out = conv_nd(dims, ch, config.resolved_out_channels * fold, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def dims(self) -> int:
        """Spatial dims of the data (1, 2 or 3)."""
        return self.config.dims

    @property
    def null_label(self) -> int | None:
        """The learned "no class" label (``num_classes``), or ``None`` without class conditioning."""
        return self.config.num_classes

    @property
    def downsample_factor(self) -> int:
        """Downsampled sizes must be multiples of this: ``patch_size * 2 ** (len(channel_mults) - 1)``."""
        return self.config.patch_size * 2 ** (len(self.config.channel_mults) - 1)

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        *,
        class_labels: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        pooled_context: Tensor | None = None,
        concat: Tensor | None = None,
        aug_level: Tensor | float | None = None,
    ) -> Tensor:
        """Predict the network output (e.g. the noise ``eps``) for ``x`` at timestep ``t``."""
        self._check_input(x)
        emb = self._embedding(x, t, class_labels, pooled_context)
        mask = self._context(x, context, context_mask)
        if self.token_pool is not None and context is not None:
            tokens = self.token_pool(context)
            emb = emb + (tokens.mean(dim=1) if mask is None else masked_mean(tokens, mask))
        if self.aug_embed is not None:  # aug_level None: the clean condition, level 0
            emb = emb + self.aug_embed(_timesteps(0.0 if aug_level is None else aug_level, x.shape[0], x.device))
        elif aug_level is not None:
            raise UserError("aug_level was given but the UNet has no augmentation embedding; set aug_embedding")
        emb = F.silu(emb)
        patch, axes = self.config.patch_size, self.config.resolved_downsample_axes()
        h = self.conv_in(patchify(self._with_coordinates(self._join(x, concat)), patch, axes))
        skips = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample) else self._run(block, h, emb, context, mask)
            skips.append(h)
        for block in self.mid:
            h = self._run(block, h, emb, context, mask)
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context, mask)
        return unpatchify(self.conv_out(silu(self.norm_out(h))), patch, axes)

    def _run(
        self, block: UNetStage, h: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None
    ) -> Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, mask, use_reentrant=False)
        return block(h, emb, context, mask)

    def _embedding(
        self, x: Tensor, t: Tensor | float, class_labels: Tensor | None, pooled: Tensor | None
    ) -> Tensor:
        """Sum of the time, class and pooled-context embeddings, shape ``(B, 4 * base_channels)``."""
        batch = x.shape[0]
        emb = self.time_embed(_timesteps(t, batch, x.device))
        if self.class_embed is not None:
            emb = emb + self.class_embed(class_labels, batch, x.device)
        elif class_labels is not None:
            raise UserError("class_labels were given but the UNet has no class embedding; set num_classes")
        if self.pooled_proj is not None and pooled is not None:
            emb = emb + self.pooled_proj(pooled)
        elif pooled is not None:
            raise UserError("pooled_context was given but the UNet has none; set pooled_context_dim")
        return emb

    def _context(self, x: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor | None:
        if context is None:
            if mask is not None:
                raise UserError("context_mask was given without context; pass both or neither")
            return None
        if self.config.context_dim is None:
            raise UserError("context was given but the UNet has no cross-attention; set context_dim")
        return check_context(context, mask, x.shape[0], self.config.context_dim)

    def _check_input(self, x: Tensor) -> None:
        check_input(x, self.config, self.downsample_factor, "input")

    def _with_coordinates(self, h: Tensor) -> Tensor:
        """``h`` with one channel per spatial axis holding that axis' coordinate in [-1, 1] (if configured)."""
        if not self.config.coordinate_channels:
            return h
        axes = [torch.linspace(-1.0, 1.0, size, device=h.device, dtype=h.dtype) for size in h.shape[2:]]
        grids = torch.meshgrid(*axes, indexing="ij")
        return torch.cat([h, torch.stack(grids).unsqueeze(0).expand(h.shape[0], -1, *h.shape[2:])], dim=1)

    def _join(self, x: Tensor, concat: Tensor | None) -> Tensor:
        """``x`` with the ``concat`` condition (upsampled to x's size) appended along channels."""
        want = self.config.concat_channels
        if concat is None or not want:
            if want or concat is not None:
                raise UserError(f"the UNet takes a concat condition of {want} channels, got "
                                + ("none; pass concat=" if concat is None else f"shape {tuple(concat.shape)}; set concat_channels"))
            return x
        if concat.dim() != x.dim() or concat.shape[0] != x.shape[0] or concat.shape[1] != want:
            raise UserError(f"concat has shape {tuple(concat.shape)}; expected ({x.shape[0]}, {want}, *spatial) for x {tuple(x.shape)}")
        if concat.shape[2:] != x.shape[2:]:
            mode = self.config.concat_resize
            if mode == "bilinear":
                mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[self.dims]
            smooth = {} if mode == "nearest" else {"align_corners": False}
            concat = F.interpolate(concat.to(x.dtype), size=tuple(x.shape[2:]), mode=mode, **smooth)
        return torch.cat([x, concat.to(x.dtype)], dim=1)


def check_input(x: Tensor, config: EncoderConfig, f: int, what: str) -> None:
    """A one-line UserError unless ``x`` is ``(B, in_channels, *spatial)`` with downsampled axes divisible by ``f``."""
    if x.dim() != 2 + config.dims or x.shape[1] != config.in_channels:
        axes = {1: "L", 2: "H, W", 3: "T, H, W"}[config.dims]
        raise UserError(f"{what} has shape {tuple(x.shape)}; expected (B, {config.in_channels}, {axes})")
    for size, down in zip(x.shape[2:], config.resolved_downsample_axes()):
        if down and size % f:
            low, high = (size // f) * f, (size // f + 1) * f
            nearest = f"{low} or {high}" if low else f"{high}"
            raise UserError(
                f"spatial size {size} (input {tuple(x.shape[2:])}) is not divisible by {f} "
                f"(the network's downsampling factor: patch_size * 2 ** (levels - 1)); resize or pad to {nearest}"
            )


def _timesteps(t: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """Broadcast a scalar or ``(B,)`` timestep to a float tensor of shape ``(B,)``."""
    t = torch.as_tensor(t, device=device)
    if not t.is_floating_point():
        t = t.float()
    if t.dim() == 0 or tuple(t.shape) == (1,):
        return t.reshape(1).expand(batch)
    if tuple(t.shape) != (batch,):
        raise UserError(f"t has shape {tuple(t.shape)}; pass a scalar or one timestep per sample ({batch},)")
    return t
