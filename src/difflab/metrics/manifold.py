"""k-NN manifold metrics: precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020).

Each real feature X_i gets a ball of radius NND_k(X_i), the distance to its k-th nearest *other* real
feature (likewise for the fake features Y_j when estimating recall). With R real and M fake samples:

    precision = 1/M sum_j 1[ exists i: ||Y_j - X_i|| <= NND_k(X_i) ]            (Kynkäänniemi, k = 3)
    recall    = 1/R sum_i 1[ exists j: ||X_i - Y_j|| <= NND_k(Y_j) ]
    density   = 1/(k M) sum_j sum_i 1[ ||Y_j - X_i|| < NND_k(X_i) ]              (Naeem, k = 5)
    coverage  = 1/R sum_i 1[ exists j: ||X_i - Y_j|| < NND_k(X_i) ]

Distances are Euclidean in float64, computed in row chunks so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch import Tensor

from difflab.errors import UserError

_CHUNK_ELEMENTS = 1 << 23  # ~64 MB of float64 distances per chunk


def _as_features(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    arr = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, np.float64)
    if arr.ndim != 2:
        raise UserError(f"{name} features must have shape (N, D), got {arr.shape}")
    return arr


def _distance_chunks(a: np.ndarray, b: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield ``(rows, D)`` with ``D[r, j] = ||a[r] - b[j]||`` for consecutive row blocks of ``a``."""
    sq_b = (b * b).sum(axis=1)
    step = max(1, _CHUNK_ELEMENTS // max(len(b), 1))
    for start in range(0, len(a), step):
        rows = slice(start, min(start + step, len(a)))
        block = a[rows]
        d2 = (block * block).sum(axis=1)[:, None] + sq_b[None, :] - 2.0 * block @ b.T
        yield rows, np.sqrt(np.clip(d2, 0.0, None))


def knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row of ``x`` to its k-th nearest other row (its own zero distance is skipped)."""
    if not 1 <= k < len(x):
        raise UserError(f"k-NN radius with k={k} needs more than {k} samples, got {len(x)}")
    radii = np.empty(len(x))
    for rows, dist in _distance_chunks(x, x):
        radii[rows] = np.partition(dist, k, axis=1)[:, k]  # index 0 is the point itself (distance 0)
    return radii


def prdc(real: Tensor | np.ndarray, fake: Tensor | np.ndarray, k_pr: int = 3,
         k_dc: int = 5) -> dict[str, float]:
    """Precision, recall (k = ``k_pr``), density and coverage (k = ``k_dc``) in one pass over distances."""
    x, y = _as_features(real, "real"), _as_features(fake, "fake")
    if x.shape[1] != y.shape[1]:
        raise UserError(f"real and fake features differ in dimension: {x.shape[1]} vs {y.shape[1]}")
    real_radii = {k: knn_radii(x, k) for k in {k_pr, k_dc}}
    r_real_pr, r_real_dc, r_fake_pr = real_radii[k_pr], real_radii[k_dc], knn_radii(y, k_pr)
    fake_in_real = np.zeros(len(y), bool)
    real_in_fake = np.zeros(len(x), bool)
    real_covered = np.zeros(len(x), bool)
    density_hits = 0
    for rows, dist in _distance_chunks(x, y):  # dist[i, j] = ||X_i - Y_j||
        fake_in_real |= (dist <= r_real_pr[rows, None]).any(axis=0)
        real_in_fake[rows] = (dist <= r_fake_pr[None, :]).any(axis=1)
        inside = dist < r_real_dc[rows, None]
        density_hits += int(inside.sum())
        real_covered[rows] = inside.any(axis=1)
    return {"precision": float(fake_in_real.mean()), "recall": float(real_in_fake.mean()),
            "density": density_hits / (k_dc * len(y)), "coverage": float(real_covered.mean())}


def precision_recall(real: Tensor | np.ndarray, fake: Tensor | np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall of Kynkäänniemi et al. 2019 with k-NN radius ``k``."""
    out = prdc(real, fake, k_pr=k, k_dc=k)
    return out["precision"], out["recall"]


def density_coverage(real: Tensor | np.ndarray, fake: Tensor | np.ndarray, k: int = 5) -> tuple[float, float]:
    """Density and coverage of Naeem et al. 2020 with k-NN radius ``k``."""
    out = prdc(real, fake, k_pr=k, k_dc=k)
    return out["density"], out["coverage"]
