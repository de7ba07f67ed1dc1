"""Units of a likelihood: nats per sample to bits per real dimension, and the N(0, I) prior.

Data convention (:mod:`difflab.data.images`): x = k / 127.5 - 1 for k in 0..255, so a pixel's bin has
width 1 / 127.5 and bits/dim = (-log p(x) + D log 127.5) / (D log 2), D the sample's real dimensions
(:meth:`difflab.space.Space.num_dims`: padded entries of a mask do not count).
"""

from __future__ import annotations

import math

from torch import Tensor

from difflab.space import Space

LN2 = math.log(2.0)


def bits_per_dim(nats: Tensor, dim: int | Tensor, bins: int | None = 256) -> Tensor:
    """-log2 P(k) / D for data x = k / ((bins-1)/2) - 1: (nats + D log((bins-1)/2)) / (D log 2).

    A density p on R^D assigns a bin of width w = 2 / (bins - 1) per axis about p(x) w^D, hence the
    offset -D log w. ``bins=None`` gives plain continuous nats / (D log 2). ``dim``: one D, or one per
    sample (B,) for masked data.
    """
    offset = 0.0 if bins is None else dim * math.log((bins - 1) / 2.0)
    out = (nats + offset) / (dim * LN2)
    return out.to(nats.dtype) if isinstance(dim, Tensor) else out


def standard_normal_log_prob(x: Tensor, mask: Tensor | None = None, space: Space | None = None) -> Tensor:
    """log N(x; 0, I) per sample over its real entries: -(|x|^2 + D log 2 pi) / 2."""
    if mask is None:
        flat = x.flatten(1)
        return -0.5 * (flat.pow(2).sum(1) + flat.shape[1] * math.log(2 * math.pi))
    space = space or Space()
    dims = space.num_dims(x, mask).to(x.dtype)
    return -0.5 * (space.sum(x.pow(2), mask) + dims * math.log(2 * math.pi))
