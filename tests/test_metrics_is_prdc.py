"""Inception Score against torchmetrics and closed forms; precision/recall/density/coverage against
brute-force loops written from the papers' definitions (torchmetrics has no PRDC)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import difflab.metrics.manifold as manifold_module
from difflab.errors import UserError
from difflab.metrics.iscore import inception_score
from difflab.metrics.manifold import density_coverage, knn_radii, prdc, precision_recall


def test_inception_score_matches_torchmetrics():
    """torchmetrics shuffles with torch.randperm before chunking and reports the unbiased std; we replay
    the same permutation and convert its std to the population std (ddof 0) of Salimans et al.'s code."""
    tm = pytest.importorskip("torchmetrics.image.inception")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 1008, generator=gen, dtype=torch.float64) * 3.0
    metric = tm.InceptionScore(feature=torch.nn.Identity(), splits=10)
    metric.update(logits)
    torch.manual_seed(1234)
    perm = torch.randperm(len(logits))
    torch.manual_seed(1234)
    tm_mean, tm_std = metric.compute()
    mean, std = inception_score(logits[perm], splits=10)
    # float64 logits, same splits and permutation as torchmetrics (~1e3 exp/log per row): seen 0; tightened from abs 1e-6 to 1e-12 (~450 eps at IS ~10.8).
    assert mean == pytest.approx(float(tm_mean), abs=1e-12)
    # float64 std over 10 splits: seen 1.8e-15; tightened from abs 1e-6 to 1e-13 (55x).
    assert std == pytest.approx(float(tm_std) * np.sqrt(9 / 10), abs=1e-13)


def test_inception_score_closed_forms():
    uniform = np.zeros((50, 7))
    assert inception_score(uniform, splits=5) == pytest.approx((1.0, 0.0))
    confident = np.log(np.eye(7) + 1e-300).repeat(4, axis=0)  # each class 4 times, p(y|x) one-hot
    assert inception_score(confident, splits=1)[0] == pytest.approx(7.0)
    # two-class example by hand: p(y|x) in {(0.9, 0.1), (0.1, 0.9)} equally often, p(y) = (0.5, 0.5)
    p = np.array([[0.9, 0.1], [0.1, 0.9]] * 3)
    kl = 0.9 * np.log(0.9 / 0.5) + 0.1 * np.log(0.1 / 0.5)
    # float64, two-class closed form (a few exp/log): seen 1.5e-16 rel; tightened from 1e-12 to 1e-14 (65x).
    assert inception_score(np.log(p), splits=1)[0] == pytest.approx(np.exp(kl), rel=1e-14)


def test_inception_score_split_boundaries_and_errors():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((23, 5))
    parts = [logits[i * 23 // 4:(i + 1) * 23 // 4] for i in range(4)]
    scores = [inception_score(part, splits=1)[0] for part in parts]
    # float64, the same per-split computation as the loop: seen 0; tightened from 1e-12 to 1e-14 (~45 eps).
    assert inception_score(logits, splits=4) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-14)
    with pytest.raises(UserError, match="at least 10 samples"):
        inception_score(logits[:5], splits=10)


def _brute_force(real: np.ndarray, fake: np.ndarray, k_pr: int, k_dc: int) -> dict[str, float]:
    """Direct transcription of Kynkäänniemi et al. 2019 (eq. 1-3) and Naeem et al. 2020 (eq. 3-4)."""
    def dist(a, b):
        return float(np.sqrt(((a - b) ** 2).sum()))

    def radius(points, i, k):
        return sorted(dist(points[i], points[j]) for j in range(len(points)) if j != i)[k - 1]

    r_pr = [radius(real, i, k_pr) for i in range(len(real))]
    f_pr = [radius(fake, j, k_pr) for j in range(len(fake))]
    r_dc = [radius(real, i, k_dc) for i in range(len(real))]
    precision = np.mean([any(dist(y, x) <= r for x, r in zip(real, r_pr)) for y in fake])
    recall = np.mean([any(dist(x, y) <= r for y, r in zip(fake, f_pr)) for x in real])
    density = sum(dist(y, x) < r for y in fake for x, r in zip(real, r_dc)) / (k_dc * len(fake))
    coverage = np.mean([any(dist(x, y) < r for y in fake) for x, r in zip(real, r_dc)])
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


@pytest.mark.parametrize("seed", [0, 1])
def test_prdc_matches_definitions(seed):
    rng = np.random.default_rng(seed)
    real = rng.standard_normal((60, 6))
    fake = rng.standard_normal((45, 6)) * 1.3 + 0.4
    fake[:3] = real[:3]  # exact duplicates across sets
    got = prdc(real, fake, k_pr=3, k_dc=5)
    want = _brute_force(real, fake, 3, 5)
    for key in want:
        # float64 counts divided by n (one rounding each, distances compared not summed): seen 0; tightened from abs 1e-12 to 1e-14 (~45 eps).
        assert got[key] == pytest.approx(want[key], abs=1e-14), key
    assert precision_recall(real, fake, k=3) == pytest.approx((want["precision"], want["recall"]))
    dc = _brute_force(real, fake, 5, 5)
    assert density_coverage(real, fake, k=5) == pytest.approx((dc["density"], dc["coverage"]))


def test_prdc_chunking_and_order_do_not_matter(monkeypatch):
    rng = np.random.default_rng(3)
    real, fake = rng.standard_normal((80, 10)), rng.standard_normal((70, 10)) + 0.2
    whole = prdc(real, fake)
    monkeypatch.setattr(manifold_module, "_CHUNK_ELEMENTS", 100)  # forces 1-2 rows per chunk
    assert prdc(real, fake) == whole
    # float64 k-NN counts are order-independent up to ties: seen 0 for every metric; tightened from abs 1e-12 to 1e-14 (~45 eps at values ~1).
    assert prdc(real[::-1], fake[rng.permutation(70)]) == pytest.approx(whole, abs=1e-14)


def test_knn_radius_needs_enough_points():
    with pytest.raises(UserError, match="k=3"):
        knn_radii(np.zeros((3, 2)), 3)
