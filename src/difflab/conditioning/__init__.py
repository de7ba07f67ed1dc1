"""Conditions of a diffusion model: the condition modules, their container and the helpers they share.

A condition is a keyword tensor sent to the network with ``x`` and ``t``: ``class_labels`` (B,) ints,
``context`` (B, L, D) token embeddings with an optional ``context_mask`` (B, L), ``pooled_context``
(B, D), ``concat`` (B, C, *spatial) joined to x with its ``aug_level`` (B,). Classifier-free guidance
(Ho & Salimans 2022) needs the model to know "no condition" too: training replaces each sample's
condition by a null one with probability ``p`` (:mod:`~difflab.conditioning.dropout`), and sampling runs
the conditional and null branches as one doubled batch (:mod:`~difflab.conditioning.pairing`).

=================  ======================================================================
``labels``         :func:`check_labels`
``pairing``        :func:`pair_conditions`, :func:`expand_conditions`, :func:`repeat_conditions`
``dropout``        :func:`drop_mask`, :func:`drop_conditions`, :func:`drop_context`
``class_label``    :class:`ClassCondition`
``text``           :class:`TextCondition`
``concat``         :class:`ConcatCondition` (noise-conditioning augmentation, Ho et al. 2021)
``conditioner``    :class:`Conditioner`, the container a model folder stores
=================  ======================================================================
"""

from difflab.conditioning.base import Condition
from difflab.conditioning.class_label import ClassCondition
from difflab.conditioning.concat import AUG_EMBED_SCALE, ConcatCondition
from difflab.conditioning.conditioner import KINDS, Conditioner
from difflab.conditioning.dropout import drop_conditions, drop_context, drop_mask
from difflab.conditioning.labels import check_labels
from difflab.conditioning.pairing import CONTEXT, CONTEXT_MASK, expand_conditions, pair_conditions, repeat_conditions
from difflab.conditioning.text import TextCondition

__all__ = [
    "AUG_EMBED_SCALE", "CONTEXT", "CONTEXT_MASK", "KINDS", "ClassCondition", "ConcatCondition", "Condition",
    "Conditioner", "TextCondition", "check_labels", "drop_conditions", "drop_context", "drop_mask",
    "expand_conditions", "pair_conditions", "repeat_conditions",
]
