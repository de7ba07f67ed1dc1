"""Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs").

    IS = exp( E_x KL( p(y|x) || p(y) ) ),   p(y) = E_x p(y|x),

computed on ``splits`` (usually 10) consecutive parts of the sample: part i holds samples
``[i N // splits, (i + 1) N // splits)``, each part gets its own marginal p(y), and the score is reported
as the mean and the (population, ddof = 0) standard deviation over parts, as in the paper's code.

Classes: the TF 2015-12-05 Inception has 1008 logits (0 = "background", 1-1000 = ImageNet, 1001-1007
unused). As in the original implementation, the softmax is taken over all 1008; the extra classes get
almost no probability, so they barely change the score. Any (N, C) logits work (e.g. a domain classifier).
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from difflab.errors import UserError


def inception_score(logits: Tensor | np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Return ``(mean, std)`` of the Inception Score over ``splits`` parts of ``logits`` ``(N, C)``.

    Example:
        >>> import numpy as np
        >>> inception_score(np.log(np.eye(4) + 1e-30).repeat(5, axis=0), splits=1)[0]  # 4 sure classes
        4.0
    """
    x = logits.detach().cpu().double().numpy() if isinstance(logits, Tensor) else np.asarray(logits, np.float64)
    if x.ndim != 2:
        raise UserError(f"Inception Score needs logits of shape (N, classes), got {x.shape}")
    n = len(x)
    if splits < 1 or n < splits:
        raise UserError(f"Inception Score with {splits} splits needs at least {splits} samples, got {n}")
    log_p = x - x.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        p = np.exp(part)
        log_marginal = np.log(p.mean(axis=0))
        kl = (p * (part - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
