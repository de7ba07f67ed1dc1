"""Vectorised, anti-aliased rendering of ``ShapeSpec`` lists to uint8 images.

Each pixel is sampled on an ``s x s`` sub-grid (supersampling); the fraction of sub-samples
inside the shape is its coverage ``alpha`` and the pixel is ``bg + alpha * (fg - bg)``.
Inside tests, in shape-local coordinates ``(u, v)`` (centre at 0, rotated by the spec angle,
``r`` = half-extent):

    circle    u^2 + v^2 <= r^2
    square    max(|u|, |v|) <= SQUARE_HALF_SIDE * r
    triangle  n_k . (u, v - TRIANGLE_CIRCUMRADIUS * r / 4) <= TRIANGLE_CIRCUMRADIUS * r / 2,  k = 1..3

The triangle is equilateral, apex up, centred on its bounding box; ``n_k`` are its outward
unit edge normals and the inradius is half the circumradius.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from difflab.data.shapes_spec import BACKGROUNDS, COLORS, POSITIONS, SIZES, ShapeSpec
from difflab.data.transforms import check_resolution
from difflab.errors import UserError

SQUARE_HALF_SIDE = 0.9
TRIANGLE_CIRCUMRADIUS = 1.1
_TRIANGLE_NORMALS = np.array([[0.0, 1.0], [np.sqrt(3) / 2, -0.5], [-np.sqrt(3) / 2, -0.5]])
# Farthest point of any shape from its centre, in units of r: the square's corner
# (SQUARE_HALF_SIDE * sqrt 2) or the triangle's base corners (sqrt(0.75^2 + 0.866^2) * circumradius).
_MAX_EXTENT = max(SQUARE_HALF_SIDE * np.sqrt(2), np.hypot(0.75, np.sqrt(3) / 2) * TRIANGLE_CIRCUMRADIUS, 1.0)
_SAMPLES_PER_CHUNK = 1 << 22  # sub-samples evaluated at once: bounds temporary memory (~16 MB each)


def shape_area(spec: ShapeSpec, resolution: int) -> float:
    """Exact area of the shape in pixels (for tests and oracles)."""
    r = SIZES[spec.size] * spec.scale * resolution
    if spec.shape == "circle":
        return float(np.pi * r * r)
    if spec.shape == "square":
        return float((2 * SQUARE_HALF_SIDE * r) ** 2)
    rc = TRIANGLE_CIRCUMRADIUS * r
    return float(3 * np.sqrt(3) / 4 * rc * rc)


def shape_center(spec: ShapeSpec) -> tuple[float, float]:
    """Centre ``(x, y)`` of the shape's bounding box (before rotation), as fractions of the side."""
    x, y = POSITIONS[spec.position]
    return x + spec.dx, y + spec.dy


def _inside(shape: str, u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Boolean inside test in shape-local coordinates (arrays broadcast to (n, H, W))."""
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= SQUARE_HALF_SIDE * r
    rc = TRIANGLE_CIRCUMRADIUS * r
    v = v - rc / 4  # bounding-box centre -> centroid (the apex is rc above the centroid)
    inside = np.ones(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    for nu, nv in _TRIANGLE_NORMALS:
        inside &= nu * u + nv * v <= rc / 2
    return inside


def _window(radius: np.ndarray, resolution: int) -> int:
    """Side in pixels of a square window that holds every shape of this radius (any rotation)."""
    return min(resolution, int(np.ceil(2 * _MAX_EXTENT * float(radius.max()) * resolution)) + 2)


def _coverage(
    specs: Sequence[ShapeSpec], resolution: int, supersample: int, window: int | None = None
) -> np.ndarray:
    """Coverage ``alpha`` in [0, 1], shape ``(n, R, R)``, for specs that all share one shape.

    Only a ``window x window`` square around each shape is sampled (the rest has alpha 0);
    ``window=resolution`` samples the whole frame.
    """
    n, s = len(specs), supersample
    centers = np.array([shape_center(sp) for sp in specs], dtype=np.float32)
    radius = np.array([SIZES[sp.size] * sp.scale for sp in specs], dtype=np.float32)
    w = _window(radius, resolution) if window is None else window
    corner = np.clip(np.floor(centers * resolution - w / 2), 0, resolution - w).astype(np.int64)
    sub = (np.arange(w * s, dtype=np.float32) + 0.5) / s  # sub-sample centres, in window pixels
    px = (corner[:, 0, None] + sub[None, :]) / resolution - centers[:, 0, None]  # (n, w*s)
    py = (corner[:, 1, None] + sub[None, :]) / resolution - centers[:, 1, None]
    theta = np.deg2rad(np.array([sp.angle for sp in specs], dtype=np.float32))[:, None, None]
    cos, sin = np.cos(theta), np.sin(theta)
    dx, dy = px[:, None, :], py[:, :, None]
    u, v = cos * dx + sin * dy, cos * dy - sin * dx
    inside = _inside(specs[0].shape, u, v, radius[:, None, None])
    counts = inside.reshape(n, w, s, w * s).sum(axis=2, dtype=np.uint16)
    counts = counts.reshape(n, w, w, s).sum(axis=3, dtype=np.uint16)
    alpha = np.zeros((n, resolution, resolution), dtype=np.float32)
    rows = corner[:, 1, None, None] + np.arange(w)[None, :, None]
    cols = corner[:, 0, None, None] + np.arange(w)[None, None, :]
    alpha[np.arange(n)[:, None, None], rows, cols] = counts / np.float32(s * s)
    return alpha


def _composite(specs: Sequence[ShapeSpec], alpha: np.ndarray) -> np.ndarray:
    """Blend shape colour over background with coverage ``alpha``; uint8 ``(n, R, R, 3)``."""
    fg = np.array([COLORS[s.color] for s in specs], dtype=np.float32)[:, None, None, :]
    bg = np.array([BACKGROUNDS[s.background] for s in specs], dtype=np.float32)[:, None, None, :]
    out = bg + alpha[..., None] * (fg - bg)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_specs(specs: Sequence[ShapeSpec], resolution: int = 32, supersample: int = 4) -> np.ndarray:
    """Render specs to uint8 RGB images ``(N, R, R, 3)``; image i depends only on ``specs[i]``."""
    resolution = check_resolution(resolution)
    if isinstance(supersample, bool) or not isinstance(supersample, int) or not 1 <= supersample <= 64:
        raise UserError(f"supersample must be an integer in 1..64, got {supersample!r}; 4 is plenty")
    out = np.empty((len(specs), resolution, resolution, 3), dtype=np.uint8)
    chunk = max(1, _SAMPLES_PER_CHUNK // (resolution * supersample) ** 2)
    groups = np.array([f"{s.shape}/{s.size}" for s in specs])  # one shape and a tight window per group
    for group_key in dict.fromkeys(groups.tolist()):
        (idx,) = np.nonzero(groups == group_key)
        for start in range(0, len(idx), chunk):
            part = idx[start : start + chunk]
            group = [specs[i] for i in part]
            out[part] = _composite(group, _coverage(group, resolution, supersample))
    return out


def render_spec(spec: ShapeSpec, resolution: int = 32, supersample: int = 4) -> np.ndarray:
    """Render one spec to a uint8 RGB image ``(R, R, 3)``."""
    return render_specs([spec], resolution, supersample)[0]
