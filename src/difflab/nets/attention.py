"""Self- and cross-attention over the spatial positions of a feature map.

Multi-head dot-product attention (Vaswani et al. 2017), ``softmax(q k^T / sqrt(d)) v``, computed by
``torch.nn.functional.scaled_dot_product_attention``. Feature maps are turned into tokens by
moving channels last: for a ``channels_last`` tensor this is a free view, so the 1x1 projections
run as plain matmuls with no copy. Works for any number of spatial dims.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from difflab.errors import UserError
from difflab.nets.blocks import group_norm, largest_divisor_at_most


def to_tokens(x: Tensor) -> Tensor:
    """``(B, C, *spatial) -> (B, N, C)`` with ``N = prod(spatial)`` (a view when channels-last)."""
    return x.movedim(1, -1).reshape(x.shape[0], -1, x.shape[1])


def from_tokens(tokens: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`to_tokens`: ``(B, N, C) -> (B, C, *spatial)`` shaped like ``like``."""
    spatial = like.shape[2:]
    return tokens.view(tokens.shape[0], *spatial, tokens.shape[-1]).movedim(-1, 1)


def split_heads(t: Tensor, heads: int) -> Tensor:
    """``(B, N, heads * d) -> (B, heads, N, d)``."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """``(B, heads, N, d) -> (B, N, heads * d)``."""
    return t.transpose(1, 2).flatten(2)


def num_heads_for(channels: int, head_channels: int) -> int:
    """Head count giving about ``head_channels`` per head, clipped to a divisor of ``channels``."""
    return largest_divisor_at_most(channels, max(1, channels // head_channels))


class SelfAttention(nn.Module):
    """Residual multi-head self-attention over all positions: ``x + proj(attn(norm(x)))``."""

    def __init__(self, channels: int, head_channels: int = 32, norm_groups: int = 32) -> None:
        super().__init__()
        self.heads = num_heads_for(channels, head_channels)
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, C, *spatial)``; returns the same shape."""
        tokens = to_tokens(self.norm(x))
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(tokens).chunk(3, dim=-1))
        out = self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))
        return from_tokens(out, x).add_(x)


class CrossAttention(nn.Module):
    """Residual multi-head attention from image positions to context tokens (Rombach et al. 2022).

    Queries come from ``norm(x)``; keys and values from ``context`` of shape ``(B, L, context_dim)``.
    ``context_mask`` of shape ``(B, L)`` marks the tokens to attend to (``True``/nonzero); every
    sample needs at least one such token.
    """

    def __init__(
        self, channels: int, context_dim: int, head_channels: int = 32, norm_groups: int = 32
    ) -> None:
        super().__init__()
        self.heads = num_heads_for(channels, head_channels)
        self.norm = group_norm(channels, norm_groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(context_dim, 2 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        """``x``: ``(B, C, *spatial)``; returns the same shape."""
        q = split_heads(self.to_q(to_tokens(self.norm(x))), self.heads)
        k, v = (split_heads(t, self.heads) for t in self.to_kv(context).chunk(2, dim=-1))
        attn_mask = None if context_mask is None else context_mask[:, None, None, :]
        out = self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)))
        return from_tokens(out, x).add_(x)


def check_context(context: Tensor, mask: Tensor | None, batch: int, context_dim: int) -> Tensor | None:
    """Validate ``context`` ``(B, L, context_dim)`` and ``mask`` ``(B, L)``; return the mask as bool."""
    if context.dim() != 3 or context.shape[0] != batch or context.shape[2] != context_dim:
        raise UserError(
            f"context has shape {tuple(context.shape)}; expected ({batch}, L, {context_dim}) "
            "(batch, tokens, context_dim)"
        )
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(context.shape[:2]):
        raise UserError(
            f"context_mask has shape {tuple(mask.shape)}; expected {tuple(context.shape[:2])} "
            "(one flag per context token)"
        )
    mask = mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise UserError("context_mask masks out every token of some sample; keep at least one token")
    return mask
