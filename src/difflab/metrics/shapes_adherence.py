"""Prompt adherence on the built-in shapes: does the shapes oracle read, in each sample, what its caption says?

One set of oracle settings (:data:`ORACLE_SETTINGS`) for everything that scores adherence: ``difflab demo``
after training and the trainer's previews (``log.jsonl``, see :mod:`difflab.recipes.diffusion`). The
oracle's training is deterministic, so it is trained once per process, resolution and setting and kept in
memory (:func:`adherence_oracle`). Its accuracy on held-out real images comes with every score.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from difflab.errors import UserError

# The demo's oracle: 6000 rendered images, 250 steps, width 16 (about 9 s on one CPU core at 32x32,
# 3 s at 16x16; it reads shape, colour and position of real 32x32 shapes 99.8 %, 100 %, 100 % right).
ORACLE_SETTINGS: dict[str, Any] = {"num_images": 6000, "steps": 250, "batch_size": 64, "width": 16}
ATTRIBUTES = ("shape", "color", "position")  # what a caption names and the oracle reads reliably at 16-32 px
_ORACLES: dict[tuple, tuple[Any, Any]] = {}


def adherence_oracle(resolution: int, settings: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """The shapes oracle at ``resolution`` (a multiple of 8) with ``settings`` (default :data:`ORACLE_SETTINGS`)
    and its :class:`~difflab.metrics.shapes_oracle.OracleReport`; trained on first use, then reused.

    Safe to call inside a training run: the global RNG and Accelerate's state are left as they were.
    """
    from difflab.metrics.shapes_oracle import train_oracle

    settings = {**ORACLE_SETTINGS, **(settings or {})}
    if resolution % 8:
        raise UserError(f"the shapes oracle reads images whose side is a multiple of 8, got {resolution}; "
                        "train at e.g. 16 or 32 pixels for prompt adherence")
    key = (int(resolution), *sorted(settings.items()))
    if key not in _ORACLES:
        with torch.random.fork_rng():
            _ORACLES[key] = train_oracle(int(resolution), progress=False, **settings)
    return _ORACLES[key]


def spec_adherence(samples: Tensor, specs: list, resolution: int | None = None, *,
                   settings: dict[str, Any] | None = None) -> dict[str, float]:
    """Fractions of ``samples`` (B, 3, R, R) in [-1, 1] whose shape, colour, both, and position the oracle
    reads as their :class:`~difflab.data.shapes_spec.ShapeSpec` (e.g. a parsed prompt) says, plus the
    oracle's accuracy on real images (``oracle_<attribute>_accuracy``)."""
    from difflab.metrics.shapes_oracle import attribute_hits

    if samples.ndim != 4 or samples.shape[1] != 3 or samples.shape[-1] != samples.shape[-2] or len(samples) != len(specs):
        raise UserError(f"prompt adherence needs square RGB samples (B, 3, R, R), one spec each; got samples "
                        f"{tuple(samples.shape)} for {len(specs)} specs")
    oracle, report = adherence_oracle(resolution or int(samples.shape[-1]), settings)
    hits = attribute_hits(oracle, samples.detach().float().cpu(), specs, ATTRIBUTES)
    scores = {a: hits[a].float().mean().item() for a in ATTRIBUTES}
    scores["shape_and_color"] = (hits["shape"] & hits["color"]).float().mean().item()
    scores.update({f"oracle_{a}_accuracy": report.accuracy[a] for a in ATTRIBUTES})
    return scores
