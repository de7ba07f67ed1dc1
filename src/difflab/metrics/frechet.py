"""Fréchet distance between two Gaussians (the FID of Heusel et al. 2017 on Inception features).

    d^2 = ||mu_1 - mu_2||^2 + Tr(S_1) + Tr(S_2) - 2 Tr((S_1 S_2)^{1/2})      (Dowson & Landau 1982)

Only the *trace* of the matrix square root is needed. Factor S_1 = B B^T with a rank-revealing pivoted
Cholesky (LAPACK ``dpstrf``; B is d x r, r = rank S_1). S_1 S_2 = B (B^T S_2) and B^T S_2 B share their
non-zero eigenvalues, and B^T S_2 B is symmetric PSD, so

    Tr((S_1 S_2)^{1/2}) = sum_i sqrt(lambda_i(B^T S_2 B))     (eigenvalues only, ``torch.linalg.eigvalsh``).

Why not ``scipy.linalg.sqrtm`` of the non-symmetric product (pytorch-fid's route)? Pivoted Cholesky of a
PSD matrix and a symmetric eigenvalue solver are backward stable and always real, so there is no imaginary
part to discard and no ``eps * I`` offset to add when covariances are rank-deficient (fewer than 2048
samples), where Schur-based ``sqrtm`` can return complex or non-finite results. It is also cheaper: no
eigenvectors, and only r x r when S_1 is low-rank (about 1 s at d = 2048 here, against ~10 s for
``sqrtm``). All in float64. Tests: agreement with pytorch-fid to 1e-6 relative (full-rank, near-singular,
singular), with a closed form, and with the exact low-rank value.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.linalg.lapack import dpstrf

from difflab.errors import UserError


def _drop_noise(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Zero the eigenvalues below ``d * eps * max|lambda|``: rounding noise of a rank-deficient matrix.

    Without this, each noise eigenvalue would add sqrt(noise) ~ 1e-8 * scale to the trace of the root.
    """
    tol = eigenvalues.abs().max() * len(eigenvalues) * torch.finfo(eigenvalues.dtype).eps
    return torch.where(eigenvalues > tol, eigenvalues, torch.zeros_like(eigenvalues))


def psd_factor(sigma: np.ndarray) -> np.ndarray:
    """``B`` (d x r) with ``sigma = B B^T`` up to rounding, r = numerical rank (pivoted Cholesky, dpstrf).

    LAPACK stops when the largest remaining pivot is below ``d * eps * max(diag)``.
    """
    factor, piv, rank, info = dpstrf(np.asarray(sigma, np.float64), lower=1, tol=-1.0)
    if info < 0:
        raise UserError(f"covariance factorisation failed (LAPACK dpstrf info={info}); check for NaN features")
    b = np.empty((len(piv), rank))
    b[piv - 1] = np.tril(factor)[:, :rank]  # P^T S P = L L^T  =>  S = (P L)(P L)^T
    return b


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``Tr((S_1 S_2)^{1/2})`` for symmetric PSD ``S_1``, ``S_2``: sum of sqrt(eig(B^T S_2 B)), S_1 = B B^T."""
    b = torch.from_numpy(psd_factor(sigma1))
    if b.shape[1] == 0:
        return 0.0
    inner = b.T @ torch.from_numpy(np.asarray(sigma2, np.float64)) @ b
    eig = torch.linalg.eigvalsh((inner + inner.T) / 2.0)
    return float(_drop_noise(eig).sqrt().sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); all computed in float64.

    Example:
        >>> import numpy as np
        >>> round(frechet_distance(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2)), 6)  # 2 + 2*(1+4-2*2)
        4.0
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise UserError(f"Fréchet distance needs matching shapes, got mu {mu1.shape} vs {mu2.shape}, "
                        f"sigma {sigma1.shape} vs {sigma2.shape}; compare statistics of the same feature layer")
    if not (np.isfinite(sigma1).all() and np.isfinite(sigma2).all()):
        raise UserError("a covariance matrix has NaN or infinite entries; check the features for NaN")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2.0, (sigma2 + sigma2.T) / 2.0
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))
