"""difflab: diffusion models that are correct to the math.

>>> import difflab
>>> pipe = difflab.DiffusionPipeline.from_pretrained("runs/demo")   # doctest: +SKIP
>>> images = pipe(num_images=4, num_inference_steps=20, sampler="dpmpp_2m", seed=0).images  # doctest: +SKIP
"""

from difflab.analytic import GaussianMixture
from difflab.denoiser import Denoiser, DenoiserOutput
from difflab.errors import UserError
from difflab.noise import NoiseSource
from difflab.pipelines.diffusion import DiffusionPipeline, PipelineOutput
from difflab.samplers import SampleResult, make_grid, sample, sampler_names
from difflab.schedules import NoiseSchedule

__version__ = "0.1.0"

__all__ = [
    "Denoiser",
    "DenoiserOutput",
    "DiffusionPipeline",
    "GaussianMixture",
    "NoiseSchedule",
    "NoiseSource",
    "PipelineOutput",
    "SampleResult",
    "UserError",
    "make_grid",
    "sample",
    "sampler_names",
]
