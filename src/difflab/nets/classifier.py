"""A noise-aware classifier ``p_phi(y | x_t, t)`` for classifier guidance (Dhariwal & Nichol 2021, sec. 4).

The UNet's encoder half, built from the same stages (:class:`~difflab.nets.unet.UNetStage`, residual
blocks conditioned on the timestep embedding, self-attention, stride-2 downsampling), followed by a
pooling head: attention pooling (their choice) or global average pooling, then a linear layer to logits.

    x_t -> conv_in -> [UNetStage x n, Downsample] per level -> middle stages -> norm, SiLU -> pool -> linear

Example:
    >>> import torch
    >>> clf = NoisyClassifier(ClassifierConfig(in_channels=1, num_classes=10, base_channels=16, channel_mults=(1, 2)))
    >>> clf(torch.randn(2, 1, 8, 8), torch.tensor([0.0, 500.0])).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from difflab.errors import UserError
from difflab.io.model_folder import PretrainedModel
from difflab.io.registry import register_network
from difflab.nets.attention import merge_heads, num_heads_for, split_heads, to_tokens
from difflab.nets.blocks import Downsample, conv_nd, group_norm
from difflab.nets.embeddings import TimestepEmbedding
from difflab.nets.unet import _timesteps, build_encoder, check_input
from difflab.nets.unet_config import EncoderConfig



@dataclass
class ClassifierConfig(EncoderConfig):
    """Shape of a :class:`NoisyClassifier`: the encoder fields of :class:`EncoderConfig` (shared with the UNet), and

    Attributes:
        num_classes: number of output classes (logits).
        pool: "attention" (a learned query attends over all positions) or "mean" (global average pool).
    """

    base_channels: int = 32
    num_res_blocks: int | tuple[int, ...] = 1
    num_classes: int = 10
    pool: Literal["attention", "mean"] = "attention"

    def _validate(self) -> None:
        super()._validate()
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise UserError(f"num_classes={self.num_classes!r} is invalid; a classifier needs an integer >= 2")
        if self.pool not in ("attention", "mean"):
            raise UserError(f"pool={self.pool!r} is invalid; use 'attention' or 'mean'")

    def encoder_config(self) -> EncoderConfig:
        """The encoder's fields alone, as an :class:`EncoderConfig`."""
        return EncoderConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EncoderConfig)})


class AttentionPool(nn.Module):
    """Pool ``(B, C, *spatial)`` to ``(B, C)``: multi-head attention from one query token to all positions.

    The query is the mean token plus a learned vector (a resolution-free variant of the attention pool
    of Radford et al. 2021, used by Dhariwal & Nichol 2021 for their classifier).
    """

    def __init__(self, channels: int, head_channels: int) -> None:
        super().__init__()
        self.heads = num_heads_for(channels, head_channels)
        self.query = nn.Parameter(torch.zeros(1, 1, channels))
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(channels, 2 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, h: Tensor) -> Tensor:
        tokens = to_tokens(h)
        mean = tokens.mean(dim=1, keepdim=True)
        q = split_heads(self.to_q(mean + self.query), self.heads)
        k, v = (split_heads(z, self.heads) for z in self.to_kv(tokens).chunk(2, dim=-1))
        return self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))[:, 0] + mean[:, 0]


@register_network
class NoisyClassifier(PretrainedModel, nn.Module):
    """Classifier of noisy inputs: ``forward(x_t, t) -> logits`` (B, num_classes), t in index units.

    ``extra_config`` holds what it was trained with (its ``"schedule"``), saved along by ``save_pretrained``.
    """

    config_class = ClassifierConfig
    description = "a noise-aware classifier"

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = enc = config
        emb_dim = 4 * enc.base_channels
        self.time_embed = TimestepEmbedding(enc.base_channels, emb_dim)
        self.conv_in = conv_nd(enc.dims, enc.in_channels, enc.base_channels * enc.channel_mults[0], 3, padding=1)
        self.down, self.mid, skips = build_encoder(enc, emb_dim, enc.dims)
        ch = skips[-1]
        self.norm_out = group_norm(ch, enc.norm_groups)
        self.pool = AttentionPool(ch, enc.head_channels) if config.pool == "attention" else None
        self.head = nn.Linear(ch, config.num_classes)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.channel_mults) - 1)

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        """Logits of ``p_phi(y | x_t, t)`` for ``x`` (B, in_channels, H, W) at index time ``t`` (scalar or (B,))."""
        self._check_input(x)
        emb = F.silu(self.time_embed(_timesteps(t, x.shape[0], x.device)))
        h = self.conv_in(x)
        for block in [*self.down, *self.mid]:
            h = block(h) if isinstance(block, Downsample) else block(h, emb, None, None)
        h = F.silu(self.norm_out(h))
        pooled = self.pool(h) if self.pool is not None else h.flatten(2).mean(-1)
        return self.head(pooled)

    def _check_input(self, x: Tensor) -> None:
        check_input(x, self.config, self.downsample_factor, "classifier input")
