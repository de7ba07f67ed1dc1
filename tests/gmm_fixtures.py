"""Shared ground truth for sampler and likelihood tests: Gaussian mixtures, a sliced Wasserstein
distance and an exact probability-flow ODE reference solve.

Import from a test module (``tests/`` is on ``sys.path`` under pytest's default import mode)::

    from gmm_fixtures import gmm2d, gmm_nd, schedule, mixture_2d, sliced_wasserstein, pf_ode_reference

Stable API (other test files rely on it):

* fixtures ``schedule`` (linear, T = 1000), ``gmm2d`` (:func:`mixture_2d`), ``gmm_nd`` (:func:`mixture_nd`),
  (``one_thread``, torch on one thread for a test, lives in conftest.py);
* :func:`mixture_2d`, :func:`mixture_nd`, :func:`sliced_wasserstein`, :func:`noise_floor`,
  :func:`pf_ode_reference`, :func:`pf_ode_velocity`, :func:`prior_noise`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from difflab.analytic import GaussianMixture
from difflab.schedules import NoiseSchedule


# ----- mixtures ----------------------------------------------------------------------------------
def mixture_2d() -> GaussianMixture:
    """Four unequal-weight, unequal-width components in 2-D, data scale about 1."""
    means = torch.tensor([[-1.5, -1.0], [1.5, -1.0], [0.0, 1.5], [1.0, 1.0]], dtype=torch.float64)
    stds = torch.tensor([[0.30, 0.30], [0.40, 0.25], [0.35, 0.45], [0.25, 0.25]], dtype=torch.float64)
    weights = torch.tensor([0.2, 0.3, 0.35, 0.15], dtype=torch.float64)
    return GaussianMixture(means, stds, weights)


def mixture_nd(dim: int = 8, components: int = 4, seed: int = 0) -> GaussianMixture:
    """``components`` random components in ``dim`` dimensions (means ~ N(0, 1), stds in [0.3, 0.6])."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(components, dim, generator=g, dtype=torch.float64)
    stds = 0.3 + 0.3 * torch.rand(components, dim, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
    return GaussianMixture(means, stds, weights)


@pytest.fixture
def schedule() -> NoiseSchedule:
    return NoiseSchedule.linear(1000)


@pytest.fixture
def gmm2d() -> GaussianMixture:
    return mixture_2d()


@pytest.fixture
def gmm_nd() -> GaussianMixture:
    return mixture_nd()


# ----- distances ---------------------------------------------------------------------------------
def sliced_wasserstein(a: Tensor, b: Tensor, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance sqrt(E_theta W2^2(theta.a, theta.b)) over random unit directions.

    Equal sizes compare sorted projections; unequal sizes compare quantiles at (i + 1/2) / m,
    m = min(len(a), len(b)). Directions are fixed by ``seed`` so two calls are comparable.
    """
    a, b = a.to(torch.float64).flatten(1), b.to(torch.float64).flatten(1)
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], n_projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa, pb = (a @ theta).sort(dim=0).values, (b @ theta).sort(dim=0).values
    if len(pa) != len(pb):
        m = min(len(pa), len(pb))
        q = (torch.arange(m, dtype=torch.float64) + 0.5) / m
        pa, pb = torch.quantile(pa, q, dim=0), torch.quantile(pb, q, dim=0)
    return math.sqrt(float(((pa - pb) ** 2).mean()))


def noise_floor(mixture: GaussianMixture, n: int, seed_a: int = 101, seed_b: int = 202, **sw_kwargs: int) -> float:
    """Sliced Wasserstein distance between two independent exact sample sets of size ``n``."""
    a = mixture.sample(n, torch.Generator().manual_seed(seed_a))
    b = mixture.sample(n, torch.Generator().manual_seed(seed_b))
    return sliced_wasserstein(a, b, **sw_kwargs)


def prior_noise(n: int, dim: int, seed: int = 0) -> Tensor:
    """Standard normal starting noise (float64), shape (n, dim)."""
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----- exact probability-flow ODE ------------------------------------------------------------------
def pf_ode_velocity(mixture: GaussianMixture, x_tilde: Tensor, s: float) -> Tensor:
    """d x~ / d s = eps(x, t) for x~ = x / alpha, s = sigma / alpha (Song et al. 2021a, eq. 14).

    This is the PF ODE of the VP SDE rewritten in VE form; alpha = 1 / sqrt(1 + s^2) and
    sigma = s alpha, so the exact eps of the mixture needs only s, not the time index.
    """
    alpha = 1.0 / math.sqrt(1.0 + s * s)
    sigma = s * alpha
    if sigma == 0.0:
        return torch.zeros_like(x_tilde)
    return -sigma * mixture.score(alpha * x_tilde, alpha, sigma)


def pf_ode_reference(
    mixture: GaussianMixture,
    schedule: NoiseSchedule,
    x: Tensor,
    t_start: float,
    t_end: float = -1.0,
    rtol: float = 1e-11,
    atol: float = 1e-11,
) -> Tensor:
    """Solve the PF ODE exactly (DOP853, tight tolerances) from ``x`` at ``t_start`` to ``t_end``.

    Integrates dx~/ds = eps in s = sigma/alpha from s(t_start) to s(t_end) (0 at the clean end
    ``t = -1``) with :func:`scipy.integrate.solve_ivp`, and returns x = alpha(t_end) x~ in float64.
    """
    x = x.to(torch.float64)
    shape = x.shape
    a0, s0 = float(schedule.alpha(t_start)), float(schedule.sigma(t_start))
    a1, s1 = float(schedule.alpha(t_end)), float(schedule.sigma(t_end))

    def rhs(s: float, y: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(y).reshape(shape)
        return pf_ode_velocity(mixture, xt, s).reshape(-1).numpy()

    y0 = (x / a0).reshape(-1).numpy()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny evaluations: threading only adds overhead
    try:
        sol = solve_ivp(rhs, (s0 / a0, s1 / a1), y0, method="DOP853", rtol=rtol, atol=atol)
    finally:
        torch.set_num_threads(threads)
    if not sol.success:
        raise RuntimeError(f"reference PF-ODE solve failed: {sol.message}")
    return a1 * torch.from_numpy(sol.y[:, -1]).reshape(shape)
