"""Captioned shapes: procedurally generated coloured shapes with exact ground truth per image.

Image i is a function of ``(seed, i)`` only: its attributes and jitter come from a counter-based
hash of ``(seed, i, draw)`` (SplitMix64; Steele, Lea & Flood, "Fast splittable pseudorandom number
generators", OOPSLA 2014), so a dataset of 100 images is the first 100 of a dataset of 10,000.

Example::

    ds = ShapesDataset(num_images=1000, resolution=32, seed=0)
    ds[0]["cond"]["caption"]      # e.g. "a large cyan square in the center on a black background"
    ds.specs[0]                 # the ShapeSpec it was rendered from
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from difflab.data.base import ArrayDataset
from difflab.data.shapes_render import render_spec, render_specs, shape_area, shape_center
from difflab.data.shapes_spec import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    VOCABULARIES,
    ShapeSpec,
    caption,
    parse_caption,
)
from difflab.data.transforms import check_resolution
from difflab.errors import UserError

__all__ = [
    "ATTRIBUTES", "BACKGROUNDS", "COLORS", "POSITIONS", "SHAPES", "SIZES", "VOCABULARIES",
    "ShapeSpec", "ShapesDataset", "caption", "parse_caption", "render_spec", "render_specs",
    "sample_specs", "shape_area", "shape_center", "POSITION_JITTER", "SCALE_JITTER", "ANGLE_JITTER",
]

POSITION_JITTER = 0.025
"""Maximum offset of the centre from its nominal position, as a fraction of the side."""
SCALE_JITTER = 0.08
"""Maximum relative change of the size."""
ANGLE_JITTER = 12.0
"""Maximum rotation in degrees (squares and triangles stay recognisably upright)."""

_DRAWS = 9  # uniforms per attempt: 5 attributes + dx, dy, scale, angle
_MAX_ATTEMPTS = 1000
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele et al. 2014): a bijective 64-bit mix; uint64 wraps by design."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniforms(seed: int, indices: np.ndarray, attempts: np.ndarray) -> np.ndarray:
    """Uniforms in [0, 1), shape ``(len(indices), _DRAWS)``, a pure function of (seed, index, attempt, draw)."""
    key = _splitmix64(np.full(1, seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64))
    key = _splitmix64(key ^ indices.astype(np.uint64))
    key = _splitmix64(key ^ attempts.astype(np.uint64))
    draws = _splitmix64(key[:, None] ^ np.arange(_DRAWS, dtype=np.uint64)[None, :])
    return (draws >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _background_table() -> tuple[np.ndarray, np.ndarray]:
    """For each colour: the indices of allowed backgrounds (padded) and how many there are."""
    colors, backgrounds = list(COLORS), list(BACKGROUNDS)
    allowed = [[b for b, name in enumerate(backgrounds) if name != c] for c in colors]
    table = np.zeros((len(colors), len(backgrounds)), dtype=np.int64)
    for c, row in enumerate(allowed):
        table[c, : len(row)] = row
    return table, np.array([len(row) for row in allowed])


def _pick(u: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """Map uniforms in [0, 1) to integers 0..n-1."""
    return np.minimum((u * n).astype(np.int64), np.asarray(n) - 1)


def _check_exclude(exclude: Iterable[tuple[str, str]]) -> set[tuple[int, int]]:
    """Validate (shape, colour) pairs and return them as index pairs."""
    pairs: set[tuple[int, int]] = set()
    for pair in exclude:
        if len(pair) != 2 or pair[0] not in SHAPES or pair[1] not in COLORS:
            raise UserError(
                f"exclude entries must be (shape, colour) pairs with shape in {', '.join(SHAPES)} "
                f"and colour in {', '.join(COLORS)}; got {pair!r}"
            )
        pairs.add((SHAPES.index(pair[0]), list(COLORS).index(pair[1])))
    if len(pairs) == len(SHAPES) * len(COLORS):
        raise UserError("exclude removes every (shape, colour) combination; leave at least one out of it")
    return pairs


def _specs_from_uniforms(u: np.ndarray) -> list[ShapeSpec]:
    """Turn rows of ``_DRAWS`` uniforms into specs (attributes first, then jitter)."""
    table, counts = _background_table()
    shape, color = _pick(u[:, 0], len(SHAPES)), _pick(u[:, 1], len(COLORS))
    size, position = _pick(u[:, 2], len(SIZES)), _pick(u[:, 3], len(POSITIONS))
    background = table[color, _pick(u[:, 4], counts[color])]
    jitter = 2.0 * u[:, 5:] - 1.0  # in [-1, 1)
    names = [SHAPES, list(COLORS), list(SIZES), list(POSITIONS), list(BACKGROUNDS)]
    return [
        ShapeSpec(names[0][s], names[1][c], names[2][z], names[3][p], names[4][b],
                  dx=POSITION_JITTER * j[0], dy=POSITION_JITTER * j[1],
                  scale=1.0 + SCALE_JITTER * j[2], angle=ANGLE_JITTER * j[3])
        for s, c, z, p, b, j in zip(shape.tolist(), color.tolist(), size.tolist(),
                                    position.tolist(), background.tolist(), jitter.tolist())
    ]


def sample_specs(
    num_images: int, seed: int = 0, exclude: Iterable[tuple[str, str]] = (), start: int = 0
) -> list[ShapeSpec]:
    """Specs of images ``start .. start+num_images-1`` for ``seed``.

    Attributes are uniform (the background uniform among those not named like the colour);
    an image whose (shape, colour) pair is in ``exclude`` is redrawn from the next attempt of
    its own counter, so every image still depends only on ``(seed, i, exclude)``.
    """
    excluded = _check_exclude(exclude)
    indices = np.arange(start, start + num_images, dtype=np.int64)
    attempts = np.zeros(num_images, dtype=np.int64)
    u = _uniforms(seed, indices, attempts)
    for _ in range(_MAX_ATTEMPTS):
        shape, color = _pick(u[:, 0], len(SHAPES)), _pick(u[:, 1], len(COLORS))
        redo = np.array([(s, c) in excluded for s, c in zip(shape.tolist(), color.tolist())], dtype=bool)
        if not redo.any():
            return _specs_from_uniforms(u)
        attempts[redo] += 1
        u[redo] = _uniforms(seed, indices[redo], attempts[redo])
    raise RuntimeError("could not draw specs outside the excluded combinations")  # probability ~0


class ShapesDataset(ArrayDataset):
    """Procedural captioned shapes, rendered once and cached as uint8.

    ``label`` picks which attribute is the class label (default "shape": circle, square,
    triangle). ``exclude`` lists (shape, colour) pairs never drawn (for held-out evaluation).
    ``specs`` holds the ground truth of every image.
    """

    def __init__(
        self,
        num_images: int = 10_000,
        resolution: int = 32,
        seed: int = 0,
        *,
        exclude: Iterable[tuple[str, str]] = (),
        label: str = "shape",
        supersample: int = 4,
        specs: Sequence[ShapeSpec] | None = None,
    ) -> None:
        resolution = check_resolution(resolution)
        if label not in ATTRIBUTES:
            raise UserError(f"unknown label attribute {label!r}; choose one of {', '.join(ATTRIBUTES)}")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise UserError(f"num_images must be a positive integer, got {num_images!r}")
        if specs is None:
            specs = sample_specs(num_images, seed, exclude)
        self.specs: list[ShapeSpec] = list(specs)
        self.seed = seed
        self.label_attribute = label
        vocab = VOCABULARIES[label]
        labels = [vocab.index(getattr(s, label)) for s in self.specs]
        super().__init__(
            render_specs(self.specs, resolution, supersample),
            labels=labels,
            class_names=list(vocab),
            captions=[caption(s) for s in self.specs],
        )

    @classmethod
    def from_specs(
        cls, specs: Sequence[ShapeSpec], resolution: int = 32, *, label: str = "shape", supersample: int = 4
    ) -> ShapesDataset:
        """A dataset of exactly these specs (e.g. held-out combinations, or parsed prompts)."""
        if len(specs) == 0:
            raise UserError("from_specs needs at least one ShapeSpec")
        return cls(len(specs), resolution, label=label, supersample=supersample, specs=specs)
