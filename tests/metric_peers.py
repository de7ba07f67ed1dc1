"""Independent answers for the ``evaluate`` / ``difflab eval`` tests: pytorch-fid's Fréchet distance,
torchmetrics' Inception Score, and precision/recall written from Kynkäänniemi et al.'s definition.

pytorch-fid imports torchvision at module level (not installable beside this torch); its
``calculate_frechet_distance`` needs only numpy/scipy, so it is imported with a throw-away ``torchvision``
stub in ``sys.modules`` (the same approach as test_metrics_frechet.py).
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch


def pytorch_fid_frechet():
    """pytorch-fid's ``calculate_frechet_distance`` (skips the test when pytorch-fid is missing)."""
    pytest.importorskip("pytorch_fid")
    fake = types.ModuleType("torchvision")
    fake.__version__ = "0.0+stub"
    fake.transforms = types.ModuleType("torchvision.transforms")
    fake.models = types.ModuleType("torchvision.models")
    fake.models.inception = types.ModuleType("torchvision.models.inception")
    for cls in ("InceptionA", "InceptionC", "InceptionE"):
        setattr(fake.models.inception, cls, type(cls, (torch.nn.Module,), {}))
    stubs = {"torchvision": fake, "torchvision.transforms": fake.transforms, "torchvision.models": fake.models,
             "torchvision.models.inception": fake.models.inception}
    keep = {k: sys.modules.get(k) for k in [*stubs, "pytorch_fid.inception", "pytorch_fid.fid_score"]}
    sys.modules.update(stubs)
    try:
        from pytorch_fid.fid_score import calculate_frechet_distance
    finally:
        for k, v in keep.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return calculate_frechet_distance


def peer_fid(fake: np.ndarray, real: np.ndarray) -> float:
    """FID of two (N, D) feature arrays: numpy mean / unbiased covariance, pytorch-fid's distance."""
    fake, real = np.asarray(fake, np.float64), np.asarray(real, np.float64)
    dist = pytorch_fid_frechet()
    return float(dist(fake.mean(0), np.cov(fake, rowvar=False), real.mean(0), np.cov(real, rowvar=False)))


def peer_inception_score(logits: torch.Tensor, splits: int) -> float:
    """torchmetrics' InceptionScore mean on precomputed logits, in the original order.

    torchmetrics permutes with ``torch.randperm`` under the global seed before splitting; we feed it the inverse
    of that permutation (replayed from the same seed), so its splits are the consecutive ones of Salimans et al.
    """
    tm = pytest.importorskip("torchmetrics.image.inception")
    logits = torch.as_tensor(logits, dtype=torch.float64)
    torch.manual_seed(4321)
    perm = torch.randperm(len(logits))
    metric = tm.InceptionScore(feature=torch.nn.Identity(), splits=splits)
    metric.update(logits[torch.argsort(perm)])
    torch.manual_seed(4321)
    mean, _ = metric.compute()
    return float(mean)


def brute_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """Precision: share of fake points inside some real point's k-NN ball (radius: distance to its k-th
    nearest other real point); recall: the same with the roles swapped. Plain double loops."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)

    def radii(pts):
        out = []
        for i in range(len(pts)):
            d = sorted(float(np.sqrt(((pts[i] - pts[j]) ** 2).sum())) for j in range(len(pts)) if j != i)
            out.append(d[k - 1])
        return out

    def inside(query, centres, rad):
        hits = 0
        for q in query:
            hits += any(np.sqrt(((q - c) ** 2).sum()) <= r for c, r in zip(centres, rad))
        return hits / len(query)

    return {"precision": inside(fake, real, radii(real)), "recall": inside(real, fake, radii(fake))}
