"""Objectives of the one trainer: :class:`Objective` (the interface) and the losses built on it.

=====================  ===============================================================================
``diffusion``          :class:`DiffusionObjective`: eps / x0 / v / EDM targets, weightings, VLB / hybrid
``noisy_classifier``   :class:`NoisyClassifierObjective`: cross-entropy on x_t (classifier guidance)
``cross_entropy``      :class:`CrossEntropyObjective`: supervised heads (domain classifier, shapes oracle)
``contrastive``        :class:`ContrastiveObjective`: CLIP's symmetric InfoNCE (ShapesCLIP)
``autoencoder``        :class:`AutoencoderObjective`: L1 + pyramid L1 + KL (+ patch GAN) of the KL autoencoder
=====================  ===============================================================================
"""

from difflab.training.objectives.autoencoder import AutoencoderObjective
from difflab.training.objectives.base import Objective, Preview
from difflab.training.objectives.contrastive import ContrastiveObjective
from difflab.training.objectives.cross_entropy import CrossEntropyObjective
from difflab.training.objectives.diffusion import DiffusionObjective
from difflab.training.objectives.noisy_classifier import NoisyClassifierObjective

__all__ = ["AutoencoderObjective", "ContrastiveObjective", "CrossEntropyObjective", "DiffusionObjective",
           "NoisyClassifierObjective", "Objective", "Preview"]
