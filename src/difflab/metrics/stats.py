"""Streaming mean and covariance of feature vectors in float64 (for FID), with an ``.npz`` format.

Chan, Golub & LeVeque 1979 ("Updating formulae and a pairwise algorithm for computing sample
variances"): two sets with counts n_a, n_b, means m_a, m_b and centred scatter matrices M_a, M_b merge as

    n = n_a + n_b,   d = m_b - m_a,   m = m_a + d n_b / n,   M = M_a + M_b + d d^T n_a n_b / n,

and the unbiased covariance is M / (n - 1) (as ``numpy.cov``). Each batch is centred on its own mean
before its scatter is formed, which avoids the cancellation of the naive ``sum x x^T - n m m^T``.
Memory is O(d^2) whatever the number of images.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from difflab.errors import UserError

STATS_FORMAT = "difflab-gaussian-stats-v1"


class GaussianStats:
    """Running count, mean and centred scatter matrix of d-dimensional features (float64)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.scatter = np.zeros((dim, dim), dtype=np.float64)

    def update(self, features: Tensor | np.ndarray) -> GaussianStats:
        """Add a batch ``(b, d)`` of feature vectors."""
        x = features.detach().cpu().double().numpy() if isinstance(features, Tensor) else np.asarray(
            features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise UserError(f"features have shape {x.shape}; expected (batch, {self.dim})")
        if len(x) == 0:
            return self
        batch = GaussianStats(self.dim)
        batch.count = len(x)
        batch.mean = x.mean(axis=0)
        centred = x - batch.mean
        batch.scatter = centred.T @ centred
        return self.merge(batch)

    def merge(self, other: GaussianStats) -> GaussianStats:
        """Fold ``other`` into ``self`` with Chan et al.'s pairwise formula; returns ``self``."""
        if other.dim != self.dim:
            raise UserError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        if other.count == 0:
            return self
        n = self.count + other.count
        delta = other.mean - self.mean
        self.scatter = self.scatter + other.scatter + np.outer(delta, delta) * (self.count * other.count / n)
        self.mean = self.mean + delta * (other.count / n)
        self.count = n
        return self

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased covariance ``scatter / (n - 1)``."""
        if self.count < 2:
            raise UserError(f"a covariance needs at least 2 samples, got {self.count}")
        return self.scatter / (self.count - 1)

    def record(self, metadata: dict[str, Any] | None = None, features: np.ndarray | None = None) -> StatsRecord:
        """Freeze into a ``StatsRecord`` (mean, unbiased covariance, count)."""
        return StatsRecord(mu=self.mean.copy(), sigma=self.covariance, count=self.count,
                           metadata=dict(metadata or {}), features=features)

    def save(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None,
             features: np.ndarray | None = None) -> Path:
        """Write ``mu``, ``sigma``, ``count``, JSON ``metadata`` (and optionally raw ``features``) to ``.npz``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": STATS_FORMAT, **(metadata or {})}
        arrays: dict[str, np.ndarray] = {"mu": self.mean, "sigma": self.covariance, "count": np.array(self.count),
                                         "metadata": np.array(json.dumps(meta))}
        if features is not None:
            arrays["features"] = np.asarray(features, dtype=np.float32)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return path


@dataclass
class StatsRecord:
    """What a statistics file holds: mean, covariance, sample count, metadata and optional raw features."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    metadata: dict[str, Any] = field(default_factory=dict)
    features: np.ndarray | None = None


def load_stats(path: str | os.PathLike) -> StatsRecord:
    """Read a file written by ``GaussianStats.save``.

    Files with only ``mu`` and ``sigma`` (pytorch-fid / clean-fid style) are accepted too; their count is
    then unknown and reported as 0.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"statistics file {str(path)!r} does not exist; compute it from reference images first")
    with np.load(path, allow_pickle=False) as data:
        if "mu" not in data or "sigma" not in data:
            raise UserError(f"{str(path)!r} has no 'mu'/'sigma' arrays; it is not a FID statistics file")
        return StatsRecord(
            mu=data["mu"].astype(np.float64), sigma=data["sigma"].astype(np.float64),
            count=int(data["count"]) if "count" in data else 0,
            metadata=json.loads(str(data["metadata"])) if "metadata" in data else {},
            features=data["features"] if "features" in data else None)
