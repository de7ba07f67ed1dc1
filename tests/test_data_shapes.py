"""Captioned shapes: determinism, geometry against an independent PIL drawing, captions, parser."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scipy.stats import chisquare

from difflab.data import shapes_render
from difflab.data.shapes import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    VOCABULARIES,
    ShapesDataset,
    ShapeSpec,
    caption,
    parse_caption,
    render_spec,
    render_specs,
    sample_specs,
    shape_area,
)
from difflab.errors import UserError

REF_SUPERSAMPLE = 32  # the PIL reference is drawn at 32x and box-averaged


def _reference_alpha(spec: ShapeSpec, resolution: int) -> tuple[np.ndarray, float]:
    """Coverage drawn with PIL from the shape definitions (independent of the numpy renderer),
    and the shape's perimeter in pixels."""
    m = resolution * REF_SUPERSAMPLE
    cx = (POSITIONS[spec.position][0] + spec.dx) * m
    cy = (POSITIONS[spec.position][1] + spec.dy) * m
    r = SIZES[spec.size] * spec.scale * m
    if spec.shape == "circle":
        local = [(r * math.cos(t), r * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 720, endpoint=False)]
    elif spec.shape == "square":
        h = 0.9 * r
        local = [(-h, -h), (h, -h), (h, h), (-h, h)]
    else:  # equilateral, apex up, circumradius 1.1 r, centred on its bounding box
        rc = 1.1 * r
        local = [(0.0, -0.75 * rc), (math.sqrt(3) / 2 * rc, 0.75 * rc), (-math.sqrt(3) / 2 * rc, 0.75 * rc)]
    a = math.radians(spec.angle)  # clockwise on screen, y down
    pts = [(cx + u * math.cos(a) - v * math.sin(a) - 0.5, cy + u * math.sin(a) + v * math.cos(a) - 0.5)
           for u, v in local]
    canvas = Image.new("L", (m, m), 0)
    ImageDraw.Draw(canvas).polygon(pts, fill=255)
    big = np.asarray(canvas, dtype=np.float64) / 255.0
    alpha = big.reshape(resolution, REF_SUPERSAMPLE, resolution, REF_SUPERSAMPLE).mean(axis=(1, 3))
    perimeter = sum(math.dist(p, q) for p, q in zip(local, local[1:] + local[:1])) / REF_SUPERSAMPLE
    return alpha, perimeter


def _alpha_from_image(image: np.ndarray, spec: ShapeSpec) -> np.ndarray:
    """Invert the compositing: alpha = <pixel - bg, fg - bg> / |fg - bg|^2."""
    fg = np.array(COLORS[spec.color], dtype=np.float64)
    bg = np.array(BACKGROUNDS[spec.background], dtype=np.float64)
    d = fg - bg
    return ((image.astype(np.float64) - bg) @ d) / (d @ d)


def _one_spec_per_geometry(seed: int = 7) -> list[ShapeSpec]:
    """Every (shape, size, position) with jitter and colours taken from generated specs."""
    rng = np.random.default_rng(seed)
    pool = sample_specs(200, seed=seed)
    specs = []
    for k, (shape, size, position) in enumerate(itertools.product(SHAPES, SIZES, POSITIONS)):
        base = pool[k]
        specs.append(ShapeSpec(shape, base.color, size, position, base.background,
                               dx=base.dx, dy=base.dy, scale=base.scale,
                               angle=float(rng.uniform(-12, 12))))
    return specs


def test_determinism_by_seed() -> None:
    a, b = ShapesDataset(40, seed=3), ShapesDataset(40, seed=3)
    assert torch.equal(a.pixels, b.pixels) and a.specs == b.specs
    c = ShapesDataset(40, seed=4)
    assert not torch.equal(a.pixels, c.pixels)


def test_image_depends_only_on_seed_and_index() -> None:
    short, long = ShapesDataset(15, seed=1), ShapesDataset(60, seed=1)
    assert short.specs == long.specs[:15]
    assert torch.equal(short.pixels, long.pixels[:15])
    assert sample_specs(10, seed=1, start=20) == sample_specs(30, seed=1)[20:]


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_geometry_matches_pil_reference(resolution: int) -> None:
    specs = _one_spec_per_geometry()
    images = render_specs(specs, resolution)
    for spec, image in zip(specs, images):
        ref, perimeter = _reference_alpha(spec, resolution)
        got = _alpha_from_image(image, spec)
        # 4x4 point sampling places an edge to within 1/8 px (worst case: an edge aligned with
        # the sub-grid); the reference adds ~1/64 px. A shape misplaced by half a pixel, mis-sized
        # by 10% or rotated the wrong way breaks these bounds.
        assert np.abs(got - ref).sum() < (1 / 8 + 1 / 32) * perimeter, spec
        assert np.abs(got - ref).max() < 0.25, spec
        assert abs(got.sum() - shape_area(spec, resolution)) < perimeter / 8, spec


def test_caption_matches_pixels() -> None:
    """Centroid in the named region, shape pixels the named colour, background the named tone."""
    resolution = 32
    specs = _one_spec_per_geometry(seed=11)
    for spec, image in zip(specs, render_specs(specs, resolution)):
        img = image.astype(int)
        is_fg = np.abs(img - COLORS[spec.color]).max(axis=-1) <= 1
        is_bg = np.abs(img - BACKGROUNDS[spec.background]).max(axis=-1) <= 1
        assert is_fg.sum() >= 0.5 * shape_area(spec, resolution), caption(spec)
        assert is_bg.mean() > 0.5, caption(spec)  # most of the image is plain background
        ys, xs = np.nonzero(is_fg)
        cx, cy = (xs.mean() + 0.5) / resolution, (ys.mean() + 0.5) / resolution
        if spec.position == "center":
            assert abs(cx - 0.5) < 0.1 and abs(cy - 0.5) < 0.1, caption(spec)
        else:
            vertical, horizontal = spec.position.split()
            assert (cy < 0.5) == (vertical == "top") and (cx < 0.5) == (horizontal == "left"), caption(spec)


def test_sizes_are_distinguishable() -> None:
    """Every small shape has less area than every large shape of the same kind, jitter included."""
    for shape in SHAPES:
        small = [ShapeSpec(shape, "red", "small", "center", "black", scale=1.08)]
        large = [ShapeSpec(shape, "red", "large", "center", "black", scale=0.92)]
        assert shape_area(small[0], 32) < 0.5 * shape_area(large[0], 32)


def test_windowed_coverage_equals_full_frame() -> None:
    specs = [s for s in sample_specs(300, seed=5) if s.shape == "triangle" and s.size == "large"]
    full = shapes_render._coverage(specs, 32, 4, window=32)
    assert np.array_equal(shapes_render._coverage(specs, 32, 4), full)


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_items_format_and_range(resolution: int) -> None:
    ds = ShapesDataset(8, resolution, seed=2)
    item = ds[0]
    assert item["x"].shape == (3, resolution, resolution) and item["x"].dtype == torch.float32
    assert item["x"].min() >= -1 and item["x"].max() <= 1
    assert item["cond"]["label"] == SHAPES.index(ds.specs[0].shape) and item["cond"]["caption"] == caption(ds.specs[0])
    assert ds.channels == 3 and ds.resolution == resolution and ds.num_classes == 3 and len(ds) == 8
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=ds.collate)))
    assert batch["x"].shape == (4, 3, resolution, resolution) and len(batch["cond"]["caption"]) == 4


def test_label_attribute() -> None:
    ds = ShapesDataset(30, label="color")
    assert ds.class_names == list(COLORS)
    assert [ds[i]["cond"]["label"] for i in range(30)] == [list(COLORS).index(s.color) for s in ds.specs]
    with pytest.raises(UserError, match="label attribute"):
        ShapesDataset(4, label="hue")


def test_attributes_are_uniform_and_background_differs() -> None:
    specs = sample_specs(6000, seed=0)
    for attribute in ("shape", "color", "size", "position"):
        counts = [sum(getattr(s, attribute) == v for s in specs) for v in VOCABULARIES[attribute]]
        assert chisquare(counts).pvalue > 1e-3, (attribute, counts)
    assert all(s.background != s.color for s in specs)
    assert {s.background for s in specs} == set(BACKGROUNDS)
    assert max(abs(s.dx) for s in specs) > 0.02 and max(abs(s.angle) for s in specs) > 10


def test_exclude_combinations() -> None:
    exclude = [("circle", "red"), ("square", "blue")]
    full, held = sample_specs(500, seed=9), sample_specs(500, seed=9, exclude=exclude)
    assert not any((s.shape, s.color) in exclude for s in held)
    for a, b in zip(full, held):  # only the excluded images are redrawn
        assert (a == b) == ((a.shape, a.color) not in exclude)
    with pytest.raises(UserError, match="shape, colour"):
        sample_specs(5, exclude=[("hexagon", "red")])
    with pytest.raises(UserError, match="every"):
        sample_specs(5, exclude=list(itertools.product(SHAPES, COLORS)))


def test_parse_caption_round_trips_every_combination() -> None:
    count = 0
    for values in itertools.product(*(VOCABULARIES[a] for a in ATTRIBUTES)):
        attrs = dict(zip(ATTRIBUTES, values))
        if attrs["background"] == attrs["color"]:
            continue
        spec = ShapeSpec(**attrs)
        assert parse_caption(caption(spec)) == spec
        count += 1
    assert count > 900
    spec = sample_specs(1, seed=4)[0]
    assert parse_caption(caption(spec)) == spec.without_jitter()
    assert parse_caption("  A Small RED circle in the top   left on a blue background. ").color == "red"


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a small orange circle in the top left on a blue background", "'orange'.*red, green"),
        ("a red small circle in the top left on a blue background", "'red' is not a size"),
        ("a small red circle on a blue background", "does not follow"),
        ("a small red circle in the top left on a red background", "invisible"),
        ("a small red circle in the left top on a blue background", "'left top' is not a position"),
    ],
)
def test_parse_caption_rejects_bad_prompts(prompt: str, expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        parse_caption(prompt)


def test_render_spec_and_from_specs() -> None:
    spec = parse_caption("a large yellow triangle in the center on a gray background")
    image = render_spec(spec, 32)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    ds = ShapesDataset.from_specs([spec, spec], 32)
    assert np.array_equal(ds.pixels[1].permute(1, 2, 0).numpy(), image)
    assert ds[0]["cond"]["caption"] == "a large yellow triangle in the center on a gray background"
