"""Conditioning embeddings for the UNet: timestep, class label and pooled text vector.

All of them map to one vector per sample of width ``emb_dim``; the UNet sums them and every
residual block reads the sum (Ho et al. 2020, "Denoising Diffusion Probabilistic Models";
Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", for class labels).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from difflab.errors import UserError


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    ``emb[:, i] = cos(t * f_i)`` and ``emb[:, half + i] = sin(t * f_i)`` with
    ``f_i = max_period ** (-i / half)``, ``half = dim // 2`` (Vaswani et al. 2017, "Attention Is
    All You Need", sec. 3.5, as used for diffusion time by Ho et al. 2020). An odd ``dim`` gets
    one trailing zero column.

    Args:
        t: timesteps of shape ``(B,)``, any real values.
        dim: embedding width.
        max_period: the longest wavelength, ``2 * pi * max_period``.

    Returns:
        Tensor of shape ``(B, dim)`` in float32 (or ``t``'s floating dtype if wider).
    """
    half = dim // 2
    dtype = t.dtype if t.is_floating_point() and t.element_size() >= 4 else torch.float32
    exponent = torch.arange(half, device=t.device, dtype=dtype) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = t.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoid of ``t`` followed by a two-layer MLP: ``W2 silu(W1 sinusoid(t))`` (Ho et al. 2020)."""

    def __init__(self, freq_dim: int, emb_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = nn.Linear(freq_dim, emb_dim)
        self.linear_2 = nn.Linear(emb_dim, emb_dim)

    def forward(self, t: Tensor) -> Tensor:
        """Map timesteps of shape ``(B,)`` to embeddings of shape ``(B, emb_dim)``."""
        h = timestep_embedding(t, self.freq_dim).to(self.linear_1.weight.dtype)
        return self.linear_2(nn.functional.silu(self.linear_1(h)))


class ClassEmbedding(nn.Module):
    """Learned class-label embedding with one extra "null" label for classifier-free guidance.

    Labels ``0 .. num_classes - 1`` are the real classes; label ``num_classes`` (``null_label``)
    means "no class" and is what ``forward(None, batch)`` uses. Training with labels randomly
    replaced by ``null_label`` gives the unconditional model needed for classifier-free guidance
    (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance").
    """

    def __init__(self, num_classes: int, emb_dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, emb_dim)

    @property
    def null_label(self) -> int:
        """Index of the learned "no class" label (equal to ``num_classes``)."""
        return self.num_classes

    def forward(self, labels: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """Embed integer labels of shape ``(B,)``; ``None`` means the null label for every sample."""
        if labels is None:
            labels = torch.full((batch,), self.null_label, dtype=torch.long, device=device)
        labels = labels.reshape(-1).to(device=device, dtype=torch.long)
        if labels.numel() != batch:
            raise UserError(
                f"class_labels has {labels.numel()} entries but the batch has {batch} samples; "
                "pass one integer label per sample"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.null_label):
            raise UserError(
                f"class label out of range [{int(labels.min())}, {int(labels.max())}]; valid labels "
                f"are 0..{self.num_classes - 1}, and {self.null_label} for 'no class'"
            )
        return self.embedding(labels)
