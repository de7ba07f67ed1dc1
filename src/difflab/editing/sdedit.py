"""SDEdit image-to-image (Meng et al. 2022): noise an input part of the way and denoise it with any sampler.

With strength s in (0, 1] and the N-step grid t_0 > ... > t_N = -1 of plain generation, SDEdit runs its last
n = max(1, round(s N)) steps: it starts at t_{N-n} from x = alpha x_in + sigma z, z ~ N(0, I) (a draw of
q(x_t | x_0 = x_in), Meng et al. 2022, sec. 3.2 with t_0 = s), so small s stays faithful to the input and large
s is more realistic. At s = 1 it starts from the prior N(0, I), exactly like generation (whose x_T ignores the
alpha_T x_0 that q(x_T | x_0) would add), so strength 1 equals plain sampling from the same seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import Denoiser, as_denoiser
from difflab.errors import UserError
from difflab.noise import NoiseSource
from difflab.samplers._common import point
from difflab.samplers.api import DEFAULT_GRIDS, FALLBACK_GRID, SampleResult, initial_noise, sample
from difflab.samplers.grids import make_grid
from difflab.samplers.registry import get_sampler
from difflab.schedules import NoiseSchedule


def check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < float(strength) <= 1.0:
        raise UserError(f"strength must lie in (0, 1], got {strength!r}; e.g. 0.5 (0: keep the input, 1: ignore it)")
    return float(strength)


def sdedit_grid(schedule: NoiseSchedule, steps: int, strength: float, kind: str = "uniform") -> Tensor:
    """The last max(1, round(strength * steps)) steps of the ``steps``-step grid of ``kind``."""
    full = make_grid(schedule, steps, kind)
    n = max(1, round(check_strength(strength) * steps))
    return full[steps - n:]


def sdedit(
    model_fn: "Denoiser | Callable[..., Tensor]",
    image: Tensor,
    strength: float = 0.6,
    sampler: str = "dpmpp_2m",
    steps: int = 20,
    schedule: "NoiseSchedule | str | dict[str, Any] | None" = None,
    generator: "torch.Generator | Sequence[torch.Generator] | NoiseSource | None" = None,
    *,
    parameterization: str = "eps",
    grid: str | None = None,
    cond: dict[str, Any] | None = None,
    progress: bool = False,
    **options: Any,
) -> SampleResult:
    """Image-to-image from ``image`` (B, ...) in the model's data space: see the module docstring. ``cond``
    (labels, prompts' embeddings, guidance) and ``options`` go to :func:`difflab.samplers.sample`."""
    strength = check_strength(strength)
    if not isinstance(image, Tensor) or image.ndim < 2:
        raise UserError("image must be a tensor of shape (batch, ...), e.g. (B, C, H, W) in [-1, 1]")
    denoiser = as_denoiser(model_fn, schedule, parameterization)
    name = getattr(get_sampler(sampler), "sampler_name", sampler)
    timesteps = sdedit_grid(denoiser.schedule, steps, strength, grid or DEFAULT_GRIDS.get(name, FALLBACK_GRID))
    source = NoiseSource.from_any(generator, image.shape[0])
    z = initial_noise(denoiser, image.shape[1:], source, image.shape[0], dtype=image.dtype, device=image.device)
    start = point(denoiser.schedule, float(timesteps[0]))
    x = z if strength == 1.0 else start.alpha * image + start.sigma * z
    return sample(denoiser, x, sampler, timesteps=timesteps, generator=source, cond=cond, progress=progress, **options)
