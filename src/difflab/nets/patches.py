"""Space-to-depth: fold ``p``-wide patches of the spatial axes into channels, and back.

``patchify`` maps ``(B, C, S_1, ..., S_d)`` to ``(B, C * p^k, S_1 / p, ...)`` where ``k`` of the ``d``
axes are patched; channel ``c * p^k + (i_1 ... i_k in base p)`` holds pixel ``(s_1 p + i_1, ...)``, the
order of :func:`torch.nn.functional.pixel_unshuffle` for images. A UNet that patchifies its input runs
its first level at ``1/p`` of the resolution (``p^2`` fewer positions for an image) without discarding
any pixel: the patch embedding of ViT / DiT (Peebles & Xie 2023) and of simple diffusion (Hoogeboom et
al. 2023), here in front of a convolutional UNet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor


def patchify(x: Tensor, p: int, axes: Sequence[bool]) -> Tensor:
    """``(B, C, *S)`` -> ``(B, C * p^k, *S')`` with ``S'_i = S_i / p`` on the ``k`` axes where ``axes[i]``."""
    if p == 1:
        return x
    b, c, *sizes = x.shape
    split = [b, c]
    for size, patched in zip(sizes, axes):
        split += [size // p, p] if patched else [size, 1]
    d = len(sizes)
    order = [0, 1] + [3 + 2 * i for i in range(d)] + [2 + 2 * i for i in range(d)]
    folded = c * p ** sum(bool(a) for a in axes)
    return x.reshape(split).permute(order).reshape(b, folded, *(s // p if a else s for s, a in zip(sizes, axes)))


def unpatchify(x: Tensor, p: int, axes: Sequence[bool]) -> Tensor:
    """The inverse of :func:`patchify`: ``(B, C * p^k, *S')`` -> ``(B, C, *S)``."""
    if p == 1:
        return x
    b, folded, *sizes = x.shape
    d = len(sizes)
    widths = [p if a else 1 for a in axes]
    c = folded // math.prod(widths)
    x = x.reshape(b, c, *widths, *sizes)
    order = [0, 1] + [i for pair in zip(range(2 + d, 2 + 2 * d), range(2, 2 + d)) for i in pair]
    return x.permute(order).reshape(b, c, *(s * w for s, w in zip(sizes, widths)))
