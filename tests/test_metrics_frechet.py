"""Fréchet distance and streaming statistics against pytorch-fid, closed forms and numpy.

pytorch-fid (test-only: ``pip install --no-deps pytorch-fid``) imports torchvision at module level, which
cannot be installed beside torch 2.13 here. Its ``calculate_frechet_distance`` uses only numpy/scipy, so
``tests/metric_peers.py`` imports it with a stub ``torchvision`` placed in ``sys.modules`` for the duration of the import (the stub
provides just the names pytorch-fid touches while importing: three base classes and two submodules).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from metric_peers import pytorch_fid_frechet

from difflab.errors import UserError
from difflab.metrics.frechet import frechet_distance
from difflab.metrics.stats import GaussianStats, load_stats


@pytest.fixture(scope="module")
def pytorch_fid_distance():
    return pytorch_fid_frechet()


def _gaussian_stats(rng: np.random.Generator, n: int, d: int, shift: float = 0.0):
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    x = np.maximum(rng.standard_normal((n, d)) @ mix + shift, 0.0)  # ReLU-like, as Inception pool3
    return x.mean(axis=0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("n, d", [(2000, 64), (40, 64), (90, 128)])
def test_matches_pytorch_fid(pytorch_fid_distance, n, d):
    """Full-rank (n >> d) and rank-deficient (n < d: near-singular product) covariances."""
    rng = np.random.default_rng(n * 1000 + d)
    mu1, s1 = _gaussian_stats(rng, n, d)
    mu2, s2 = _gaussian_stats(rng, n + 7, d, shift=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's deprecation of sqrtm(disp=...)
        expected = pytorch_fid_distance(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_singular_covariance_matches_pytorch_fid(pytorch_fid_distance):
    """Exactly singular covariances (duplicated and constant features), where sqrtm hits a singular product."""
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((500, 32)), rng.standard_normal((500, 32)) + 0.2
    x[:, 5], y[:, 5] = x[:, 4], y[:, 4]
    x[:, 7], y[:, 7] = 1.0, 1.0
    args = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = pytorch_fid_distance(*args)
    assert frechet_distance(*args) == pytest.approx(expected, rel=1e-6)


def test_closed_form_diagonal():
    """Commuting covariances: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3.0, 50), rng.uniform(0.1, 3.0, 50)
    mu1, mu2 = rng.standard_normal(50), rng.standard_normal(50)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_low_rank_identity_from_features():
    """n < d: Tr((S1 S2)^1/2) = sum of singular values of A1 A2^T / sqrt((n1-1)(n2-1)), A = centred data."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((30, 300)), rng.standard_normal((45, 300)) * 1.5 + 0.3
    a1, a2 = x - x.mean(0), y - y.mean(0)
    tr_sqrt = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt(29 * 44)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    expected = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(x.mean(0), s1, y.mean(0), s2) == pytest.approx(expected, rel=1e-9)


def test_same_statistics_give_zero():
    rng = np.random.default_rng(2)
    mu, s = _gaussian_stats(rng, 100, 128)  # rank-deficient on purpose
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-6 * np.trace(s)


def test_shape_mismatch_is_a_user_error():
    with pytest.raises(UserError, match="matching shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
def test_streaming_stats_equal_numpy_for_any_batch_size(batch):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 16)) * 0.5 + 1e4  # large offset: naive sum-of-squares would cancel
    stats = GaussianStats(16)
    for i in range(0, len(x), batch):
        stats.update(x[i:i + batch])
    assert stats.count == 300
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(stats.covariance, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-12)


def test_merge_equals_single_pass_and_roundtrips(tmp_path):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((90, 8))
    a, b, whole = GaussianStats(8).update(x[:20]), GaussianStats(8).update(x[20:]), GaussianStats(8).update(x)
    a.merge(b)
    np.testing.assert_allclose(a.covariance, whole.covariance, rtol=1e-12)
    path = whole.save(tmp_path / "s.npz", metadata={"extractor": "test"}, features=x[:5])
    rec = load_stats(path)
    assert rec.count == 90 and rec.metadata["extractor"] == "test" and rec.features.shape == (5, 8)
    np.testing.assert_array_equal(rec.sigma, whole.covariance)


def test_stats_reject_wrong_dimension():
    with pytest.raises(UserError, match="expected"):
        GaussianStats(4).update(np.zeros((3, 5)))
