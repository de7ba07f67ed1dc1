"""Text conditioning: the embedding a UNet reads and the interface every text encoder follows.

A :class:`TextEncoder` turns a list of prompts into a :class:`TextEmbedding`:

* ``tokens`` ``(B, L, D)``: one feature vector per token, read by the UNet's cross-attention
  (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models");
* ``mask`` ``(B, L)``: ``True`` for real tokens, ``False`` for padding (rows are right-padded);
* ``pooled`` ``(B, P)``: one vector per prompt, added to the UNet's time embedding;
* ``is_null`` ``(B,)``: rows that stand for the empty prompt, i.e. no condition.

Null convention (the empty or blank prompt ``""``): ``tokens`` and ``pooled`` are zero and the mask
keeps only position 0. The UNet's cross-attention then attends to a single zero token, so its output
is a constant (the key/value biases), the same for every image, and attention stays well defined
(a fully masked row would give NaN). A trainer that learns its own null condition for
classifier-free guidance (Ho & Salimans 2022) replaces the rows flagged by ``is_null``.

Example:
    >>> import torch
    >>> emb = null_embedding(2, dim=4, pooled_dim=3)
    >>> emb.tokens.shape, emb.mask.tolist(), emb.is_null.tolist()
    (torch.Size([2, 1, 4]), [[True], [True]], [True, True])
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from difflab.errors import UserError

__all__ = [
    "TextEmbedding",
    "TextEncoder",
    "check_prompts",
    "is_null_prompt",
    "last_token",
    "masked_mean",
    "null_embedding",
]


@dataclass
class TextEmbedding:
    """Encoded prompts; see the module docstring for the meaning and shape of each field.

    ``tokens`` is exactly zero wherever ``mask`` is ``False``, so padding carries no information and
    re-padding a row (:meth:`cat`) reproduces it bit for bit.
    """

    tokens: Tensor
    mask: Tensor
    pooled: Tensor
    is_null: Tensor

    def __post_init__(self) -> None:
        b = self.tokens.shape[0]
        if (
            self.tokens.dim() != 3
            or tuple(self.mask.shape) != tuple(self.tokens.shape[:2])
            or self.pooled.dim() != 2
            or self.pooled.shape[0] != b
            or tuple(self.is_null.shape) != (b,)
        ):
            raise UserError(
                f"inconsistent TextEmbedding shapes: tokens {tuple(self.tokens.shape)}, mask "
                f"{tuple(self.mask.shape)}, pooled {tuple(self.pooled.shape)}, is_null {tuple(self.is_null.shape)}; "
                "expected (B, L, D), (B, L), (B, P), (B,)"
            )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def length(self) -> int:
        """``L``, the number of token positions (after padding)."""
        return self.tokens.shape[1]

    def to(self, device: torch.device | str) -> TextEmbedding:
        """The same embedding on ``device``."""
        return TextEmbedding(*(t.to(device) for t in self.fields()))

    def select(self, index: Tensor | Sequence[int] | slice) -> TextEmbedding:
        """Rows ``index`` (a list or tensor of row numbers, or a slice)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long, device=self.tokens.device)
        return TextEmbedding(*(t[index] for t in self.fields()))

    def trim(self) -> TextEmbedding:
        """Drop the trailing positions that no row attends to (keeps at least one)."""
        keep = max(int(self.mask.sum(dim=1).max()), 1) if len(self) else 1
        return TextEmbedding(self.tokens[:, :keep], self.mask[:, :keep], self.pooled, self.is_null)

    def unet_kwargs(self) -> dict[str, Tensor]:
        """Keyword arguments for :class:`~difflab.nets.unet.UNet`: ``context``, ``context_mask``, ``pooled_context``."""
        return {"context": self.tokens, "context_mask": self.mask, "pooled_context": self.pooled}

    @staticmethod
    def cat(embeddings: Sequence[TextEmbedding]) -> TextEmbedding:
        """Stack embeddings along the batch, zero-padding (mask ``False``) to the longest ``L``."""
        if not embeddings:
            raise UserError("TextEmbedding.cat got an empty list; pass at least one embedding")
        length = max(e.length for e in embeddings)
        padded = [e._padded(length) for e in embeddings]
        return TextEmbedding(*(torch.cat(parts) for parts in zip(*(e.fields() for e in padded))))

    def _padded(self, length: int) -> TextEmbedding:
        extra = length - self.length
        if extra == 0:
            return self
        pad_tokens = self.tokens.new_zeros(len(self), extra, self.tokens.shape[2])
        pad_mask = self.mask.new_zeros(len(self), extra)
        return TextEmbedding(
            torch.cat([self.tokens, pad_tokens], 1), torch.cat([self.mask, pad_mask], 1), self.pooled, self.is_null
        )

    def fields(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(tokens, mask, pooled, is_null)``."""
        return self.tokens, self.mask, self.pooled, self.is_null


def null_embedding(
    batch: int,
    dim: int,
    pooled_dim: int,
    length: int = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> TextEmbedding:
    """``batch`` unconditional rows: zero tokens and pooled vector, mask ``True`` at position 0 only."""
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    mask[:, 0] = True
    return TextEmbedding(
        tokens=torch.zeros(batch, length, dim, dtype=dtype, device=device),
        mask=mask,
        pooled=torch.zeros(batch, pooled_dim, dtype=dtype, device=device),
        is_null=torch.ones(batch, dtype=torch.bool, device=device),
    )


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden`` ``(B, L, D)`` over the positions where ``mask`` ``(B, L)`` is true: ``(B, D)``.

    ``sum_l m_l h_l / sum_l m_l``, the mean pooling of Sentence-BERT (Reimers & Gurevych 2019).
    """
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def last_token(hidden: Tensor, mask: Tensor) -> Tensor:
    """The state at each row's last unmasked position ``(B, D)`` (CLIP's end-of-text token, Radford et al. 2021)."""
    last = mask.long().sum(dim=1).clamp(min=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def is_null_prompt(prompt: str) -> bool:
    """Whether ``prompt`` means "no condition": empty or only whitespace."""
    return not prompt.strip()


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """``prompts`` as a list of strings, or a ``UserError`` naming what is wrong."""
    if isinstance(prompts, str):
        raise UserError(f"prompts must be a list of strings, got the string {prompts[:40]!r}; wrap it: [prompt]")
    prompts = list(prompts)
    if not prompts:
        raise UserError("prompts is empty; pass at least one prompt ('' for unconditional)")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise UserError(f"prompts must all be strings, got {type(bad[0]).__name__} {bad[0]!r}; convert it with str()")
    return prompts


class TextEncoder(ABC):
    """A frozen prompt encoder: ``encode(prompts) -> TextEmbedding``, no gradients, no training mode.

    It is not an ``nn.Module`` on purpose: a trainer calling ``.train()`` or collecting
    ``.parameters()`` on its model never reaches the encoder.
    """

    @property
    @abstractmethod
    def dim(self) -> int:
        """Width ``D`` of each token vector (the UNet's ``context_dim``)."""

    @property
    @abstractmethod
    def pooled_dim(self) -> int:
        """Width ``P`` of the pooled vector (the UNet's ``pooled_context_dim``)."""

    @property
    @abstractmethod
    def max_length(self) -> int:
        """Most tokens per prompt, special tokens included; longer prompts are truncated with a warning."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the outputs are made."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """Floating type of the outputs."""

    @abstractmethod
    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        """Embed ``prompts``; empty prompts give null rows (see the module docstring)."""

    @abstractmethod
    def to(self, device: torch.device | str) -> TextEncoder:
        """Move the encoder to ``device``; returns ``self``."""

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """JSON-friendly spec that :func:`~difflab.nets.text_encoder.load_text_encoder` turns back into an encoder."""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TextEncoder:
        """Rebuild an encoder from :meth:`to_config` output."""
        from difflab.nets.text_encoder import load_text_encoder

        return load_text_encoder(config)

    def __call__(self, prompts: Sequence[str]) -> TextEmbedding:
        return self.encode(prompts)

    def null_embedding(self, batch: int, length: int = 1) -> TextEmbedding:
        """``batch`` unconditional rows in this encoder's widths, device and dtype."""
        return null_embedding(batch, self.dim, self.pooled_dim, length, self.device, self.dtype)
