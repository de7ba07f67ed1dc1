"""difflab: diffusion models that are correct to the math.

>>> import difflab
>>> pipe = difflab.DiffusionPipeline.from_pretrained("runs/demo")   # doctest: +SKIP
>>> images = pipe(num_images=4, num_inference_steps=20, sampler="dpmpp_2m", seed=0).images  # doctest: +SKIP
>>> from difflab import Text2ImagePipeline                         # doctest: +SKIP

The top-level names are imported on first access (PEP 562 module ``__getattr__``), so ``import difflab``
(and ``difflab --help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from difflab.errors import UserError

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY: dict[str, str] = {
    "GaussianMixture": "difflab.analytic",
    "Denoiser": "difflab.denoiser",
    "DenoiserOutput": "difflab.denoiser",
    "NoiseSource": "difflab.noise",
    "DiffusionPipeline": "difflab.pipelines.diffusion",
    "PipelineOutput": "difflab.pipelines.diffusion",
    "Text2ImagePipeline": "difflab.pipelines.text2image",
    "Text2ImageOutput": "difflab.pipelines.text2image",
    "SampleResult": "difflab.samplers",
    "make_grid": "difflab.samplers",
    "sample": "difflab.samplers",
    "sampler_names": "difflab.samplers",
    "NoiseSchedule": "difflab.schedules",
    "Space": "difflab.space",
    "train": "difflab.recipes",
    "TrainConfig": "difflab.training.config",
    "Trainer": "difflab.training.trainer",
    "Objective": "difflab.training.objectives.base",
}

__all__ = sorted([*_LAZY, "UserError"])


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'difflab' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
