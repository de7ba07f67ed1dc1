"""Random fill masks for training inpainting models (Palette, Saharia et al. 2022, sec. 5: boxes, free-form
strokes, halves and outpainting borders). Every draw comes from the caller's ``torch.Generator``, so a training
step's masks are a function of its seed (exact resume).

A mask is a bool tensor (H, W), True where the model must fill.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.errors import UserError

MASK_KINDS: tuple[str, ...] = ("box", "stroke", "half", "border")


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """An int in [low, high] (both ends included)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def box_mask(h: int, w: int, generator: torch.Generator) -> Tensor:
    """A rectangle whose sides are uniform in [1/4, 1/2] of the image's, at a uniform position."""
    bh, bw = _randint(generator, max(1, h // 4), max(1, h // 2)), _randint(generator, max(1, w // 4), max(1, w // 2))
    top, left = _randint(generator, 0, h - bh), _randint(generator, 0, w - bw)
    fill = torch.zeros(h, w, dtype=torch.bool)
    fill[top:top + bh, left:left + bw] = True
    return fill


def stroke_mask(h: int, w: int, generator: torch.Generator) -> Tensor:
    """A free-form brush stroke: 2-5 connected segments of length 1/4-1/2 of the side at random angles, drawn
    with a round brush of radius max(1, side / 12) (every pixel within that distance of a segment)."""
    side = min(h, w)
    radius = max(1.0, side / 12)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    fill = torch.zeros(h, w, dtype=torch.bool)
    y, x = _uniform(generator, 0, h - 1), _uniform(generator, 0, w - 1)
    for _ in range(_randint(generator, 2, 5)):
        angle, length = _uniform(generator, 0, 2 * math.pi), _uniform(generator, side / 4, side / 2)
        y1 = min(max(y + length * math.sin(angle), 0.0), h - 1.0)
        x1 = min(max(x + length * math.cos(angle), 0.0), w - 1.0)
        dy, dx = y1 - y, x1 - x
        along = ((ys - y) * dy + (xs - x) * dx) / max(dy * dy + dx * dx, 1e-12)  # the nearest point's position on the segment
        f = along.clamp(0, 1)
        fill |= (ys - (y + f * dy)) ** 2 + (xs - (x + f * dx)) ** 2 <= radius**2
        y, x = y1, x1
    return fill


def half_mask(h: int, w: int, generator: torch.Generator) -> Tensor:
    """The left, right, top or bottom half."""
    fill = torch.zeros(h, w, dtype=torch.bool)
    side = _randint(generator, 0, 3)
    if side == 0:
        fill[:, : w // 2] = True
    elif side == 1:
        fill[:, w // 2:] = True
    elif side == 2:
        fill[: h // 2] = True
    else:
        fill[h // 2:] = True
    return fill


def border_mask(h: int, w: int, generator: torch.Generator) -> Tensor:
    """Outpainting: a strip along one side, 1/4 to 1/2 of the image deep."""
    fill = torch.zeros(h, w, dtype=torch.bool)
    side = _randint(generator, 0, 3)
    depth = _randint(generator, max(1, (w if side < 2 else h) // 4), max(1, (w if side < 2 else h) // 2))
    if side == 0:
        fill[:, :depth] = True
    elif side == 1:
        fill[:, w - depth:] = True
    elif side == 2:
        fill[:depth] = True
    else:
        fill[h - depth:] = True
    return fill


_MAKERS = {"box": box_mask, "stroke": stroke_mask, "half": half_mask, "border": border_mask}


def check_mask_kinds(kinds: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    bad = [k for k in kinds if k not in MASK_KINDS]
    if not kinds or bad:
        raise UserError(f"mask kinds {list(kinds)} are invalid; choose from {', '.join(MASK_KINDS)}")
    return tuple(kinds)


def random_fill_masks(batch: int, h: int, w: int, generator: torch.Generator,
                      kinds: tuple[str, ...] = MASK_KINDS) -> Tensor:
    """(batch, 1, h, w) fill masks, each of a kind drawn uniformly from ``kinds``."""
    kinds = check_mask_kinds(kinds)
    masks = [_MAKERS[kinds[_randint(generator, 0, len(kinds) - 1)]](h, w, generator) for _ in range(batch)]
    return torch.stack(masks)[:, None]
