"""Gaussian mixtures: data whose noised marginals, score and density are known exactly.

If x_0 ~ sum_k w_k N(mu_k, diag(s_k^2)) then under the VP process
x_t ~ sum_k w_k N(alpha mu_k, diag(alpha^2 s_k^2 + sigma^2)) — a Gaussian mixture again — so the exact
score, eps = -sigma * score, E[x_0 | x_t] (Tweedie: (x_t + sigma^2 score) / alpha) and log q_t(x) are
closed form at every t. Samplers, the probability-flow ODE and likelihoods are checked against it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.schedules import NoiseSchedule, broadcast_to


class GaussianMixture:
    """A diagonal Gaussian mixture with means (K, D), standard deviations (K, D) or (K,), weights (K,)."""

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor | None = None) -> None:
        self.means = torch.as_tensor(means, dtype=torch.float64)
        K, D = self.means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64)
        self.stds = stds[:, None].expand(K, D).clone() if stds.ndim == 1 else stds.clone()
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k] * z

    def noised(self, alpha: float, sigma: float) -> "GaussianMixture":
        """The marginal q_t for scalar (alpha, sigma)."""
        var = (alpha * self.stds) ** 2 + sigma**2
        return GaussianMixture(alpha * self.means, var.sqrt(), self.weights)

    def _component_log_probs(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """log w_k N(x; alpha mu_k, var_k) per component (B, K), and var (B, K, D)."""
        x = x.to(torch.float64)
        alpha, sigma = alpha.reshape(-1, 1, 1), sigma.reshape(-1, 1, 1)
        mean = alpha * self.means[None]
        var = (alpha * self.stds[None]) ** 2 + sigma**2
        diff = x[:, None, :] - mean
        logp = -0.5 * ((diff**2) / var + torch.log(2 * math.pi * var)).sum(-1)
        return logp + torch.log(self.weights)[None], var

    def log_prob(self, x: Tensor, alpha: Tensor | float = 1.0, sigma: Tensor | float = 0.0) -> Tensor:
        """log q_t(x) for x of shape (B, D); alpha, sigma scalars or (B,)."""
        alpha, sigma = self._as_batch(alpha, x), self._as_batch(sigma, x)
        logp, _ = self._component_log_probs(x, alpha, sigma)
        return torch.logsumexp(logp, dim=1)

    def score(self, x: Tensor, alpha: Tensor | float = 1.0, sigma: Tensor | float = 0.0) -> Tensor:
        """grad_x log q_t(x) = sum_k r_k(x) (alpha mu_k - x) / var_k, r_k the responsibilities."""
        alpha, sigma = self._as_batch(alpha, x), self._as_batch(sigma, x)
        logp, var = self._component_log_probs(x, alpha, sigma)
        resp = torch.softmax(logp, dim=1)[..., None]
        mean = alpha.reshape(-1, 1, 1) * self.means[None]
        return (resp * (mean - x.to(torch.float64)[:, None, :]) / var).sum(1)

    @staticmethod
    def _as_batch(v: Tensor | float, x: Tensor) -> Tensor:
        v = torch.as_tensor(v, dtype=torch.float64)
        return v.expand(x.shape[0]) if v.ndim == 0 else v

    def eps_model(self, schedule: NoiseSchedule):
        """The exact noise predictor ``model_fn(x, t) -> eps`` for ``x`` of shape (B, D), t in index units."""

        def model_fn(x: Tensor, t: Tensor) -> Tensor:
            t64 = t.detach().to(torch.float64).cpu()
            alpha, sigma = schedule.alpha(t64), schedule.sigma(t64)
            eps = -broadcast_to(sigma, x.to(torch.float64)) * self.score(x, alpha, sigma)
            return eps.to(x.dtype)

        return model_fn
