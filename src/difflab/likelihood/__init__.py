"""Likelihoods of a diffusion model, in one place: the exact ODE log-likelihood and the discrete VLB.

* :func:`ode_log_likelihood` (:mod:`.ode`): log p(x) of the probability-flow ODE model by the
  instantaneous change of variables (Chen et al. 2018, thm. 1; Song et al. 2021, app. D.2), with an
  exact or a Hutchinson divergence (Hutchinson 1989; Grathwohl et al. 2019, FFJORD).
* :func:`vlb_bits_per_dim` (:mod:`.vlb`): the DDPM variational bound (Ho et al. 2020, eq. 5; Nichol &
  Dhariwal 2021, sec. 2) with the discretised Gaussian decoder for 8-bit data, and its terms
  (:func:`vlb_term`, :func:`vlb_bits`), which the training loss (:mod:`difflab.losses`) shares.
* :func:`bits_per_dim` (:mod:`.bits`): nats to bits per real dimension.

Both take ``mask=None`` (:mod:`difflab.space`): padded entries do not contribute, and D counts the real
dimensions. See docs/likelihood.md.
"""

from difflab.likelihood.bits import LN2, bits_per_dim, standard_normal_log_prob
from difflab.likelihood.ode import (
    DIVERGENCES,
    METHODS,
    PROBES,
    LikelihoodResult,
    augmented_field,
    dequantize,
    ode_log_likelihood,
)
from difflab.likelihood.vlb import (
    VLBResult,
    discretized_gaussian_log_likelihood,
    gaussian_kl,
    vlb_bits,
    vlb_bits_per_dim,
    vlb_term,
)

__all__ = [
    "DIVERGENCES",
    "LN2",
    "METHODS",
    "PROBES",
    "LikelihoodResult",
    "VLBResult",
    "augmented_field",
    "bits_per_dim",
    "dequantize",
    "discretized_gaussian_log_likelihood",
    "gaussian_kl",
    "ode_log_likelihood",
    "standard_normal_log_prob",
    "vlb_bits",
    "vlb_bits_per_dim",
    "vlb_term",
]
