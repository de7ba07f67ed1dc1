"""The public sampling entry point, ``difflab.sample``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from difflab.denoiser import Denoiser, DenoiserOutput, as_denoiser
from difflab.errors import UserError
from difflab.noise import NoiseSource
from difflab.samplers._common import StepCallback
from difflab.samplers.grids import check_grid, make_grid
from difflab.samplers.registry import SamplerFn, get_sampler, sampler_options
from difflab.schedules import NoiseSchedule
from difflab.space import ProjectedNoise, Space

# Default grid per sampler (see docs/samplers.md for the measurements behind the choice).
DEFAULT_GRIDS: dict[str, str] = {
    "ddpm": "uniform",
    "ddim": "uniform",
    "euler": "uniform",
    "heun": "karras",
    "euler_maruyama": "uniform",
    "euler_maruyama_ve": "uniform",
    "pc": "uniform",
}
FALLBACK_GRID = "logsnr"  # every DPM-Solver variant, and samplers registered elsewhere


class SampleResult(NamedTuple):
    """Final samples at the clean end t = -1, and the number of model evaluations spent."""

    samples: Tensor
    nfe: int


class TrackedDenoiser:
    """The denoiser as a sampler sees it: binds ``cond``, holds the step ``callback`` and ticks a progress
    bar on each evaluation.

    The bar is opened at the first evaluation, so a sampler that rejects its options before doing any
    work prints only its error.
    """

    def __init__(self, denoiser: Denoiser, cond: dict[str, Any], name: str, total: int | None, progress: bool,
                 callback: StepCallback | None = None) -> None:
        self.denoiser, self.cond, self.callback = denoiser, cond, callback
        self.bar_args = {"total": total, "disable": not progress, "desc": name, "unit": "nfe"}
        self.bar: Any = None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    @property
    def schedule(self) -> NoiseSchedule:
        return self.denoiser.schedule

    @property
    def space(self) -> Space:
        return self.denoiser.space

    @property
    def form(self) -> str:
        """"mean" for classifier guidance that the ancestral sampler applies to its step mean."""
        return getattr(self.denoiser, "form", "eps")

    def ancestral_shift(self, x: Tensor, t: Tensor | float, mean: Tensor, var: Any) -> Tensor:
        return self.denoiser.ancestral_shift(x, t, mean, var)

    def __call__(self, x: Tensor, t: Tensor | float) -> DenoiserOutput:
        out = self.denoiser(x, t, **self.cond)
        if self.bar is None:
            self.bar = tqdm(**self.bar_args)
        self.bar.update(1)
        return out


def expected_nfe(sampler: str, steps: int, **options: Any) -> int | None:
    """Model evaluations of a built-in sampler for ``steps`` steps ending at t = -1 (None if unknown).

    Heun: 2N - 1 (Euler into the clean end); singlestep DPM-Solver-k: k (N - 1) + 1; predictor-corrector:
    N (1 + n_corrector); rk45: adaptive (None); all others: N.
    """
    orders = {"dpm_solver_1": 1, "dpm_solver_2": 2, "dpm_solver_3": 3, "dpm_solver": options.get("order", 3)}
    if sampler == "heun":
        return 2 * steps - 1
    if sampler in orders:
        return int(orders[sampler]) * (steps - 1) + 1
    if sampler == "pc":
        return steps * (1 + int(options.get("n_corrector", 1)))
    known = ("ddpm", "ddim", "euler", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc", "euler_maruyama", "euler_maruyama_ve")
    return steps if sampler in known else None


def _check_options(fn: SamplerFn, name: str, options: dict[str, Any]) -> None:
    valid = sampler_options(fn)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(f"{k}={v!r}" for k, v in valid.items()) or "none"
        raise UserError(f"unknown option(s) {unknown} for sampler {name!r}; valid options: {listed}")


def sample(
    model_fn: "Denoiser | Callable[..., Tensor]",
    noise: Tensor,
    sampler: "str | SamplerFn" = "dpmpp_2m",
    steps: int = 10,
    schedule: "NoiseSchedule | str | dict[str, Any] | None" = None,
    generator: "torch.Generator | Sequence[torch.Generator] | NoiseSource | None" = None,
    *,
    parameterization: str = "eps",
    grid: str | None = None,
    timesteps: "Tensor | Sequence[float] | None" = None,
    progress: bool = False,
    cond: dict[str, Any] | None = None,
    callback: StepCallback | None = None,
    **options: Any,
) -> SampleResult:
    """Integrate from ``noise`` (the state at the grid's first time, standard normal for a VP model) to data.

    ``model_fn`` is a :class:`Denoiser` (then ``schedule`` and ``parameterization`` are taken from it)
    or a callable ``model_fn(x, t) -> eps | x0 | v`` with t in index units; ``schedule`` may then be a
    :class:`NoiseSchedule`, a kind name (``"linear"``: T = 1000) or a config dict. ``generator``: None, one
    torch.Generator (shared by the batch), one per sample, or a :class:`NoiseSource`; only stochastic
    samplers draw from it, so sample i depends only on generator i when one per sample is given.
    ``grid`` picks a named grid (:func:`make_grid`; default per sampler in ``DEFAULT_GRIDS``, else
    "logsnr"); ``timesteps`` gives an explicit decreasing grid ending at -1 and overrides ``steps``.
    ``options`` are the sampler's keyword options (e.g. ``eta`` for "ddim"). The stochastic samplers'
    noise is projected by the denoiser's :class:`~difflab.space.Space` (row i still from generator i).

    ``callback(step, x, denoised) -> Tensor | None`` runs once per sampler step, after the step, with
    the new state and the x0 estimate the step used (steps 0 .. N-1; rk45: once per accepted solver
    iteration, then the final denoise). A returned tensor replaces x: this is how replacement-based
    inpainting and RePaint plug in. Multistep solvers (dpmpp_*, unipc) keep their history of model
    outputs, which a replacement does not rewrite; UniPC calls it with the predicted state and adds its
    correction to the returned one.

    >>> import torch, difflab
    >>> sched = difflab.schedules.NoiseSchedule.linear(1000)
    >>> out = sample(lambda x, t: torch.zeros_like(x), torch.randn(4, 2), "ddim", steps=5, schedule=sched)
    >>> out.samples.shape, out.nfe
    (torch.Size([4, 2]), 5)
    """
    fn = get_sampler(sampler)
    name = getattr(fn, "sampler_name", getattr(fn, "__name__", "sampler"))
    _check_options(fn, name, options)
    if not isinstance(noise, Tensor) or noise.ndim < 1 or noise.shape[0] < 1:
        raise UserError("noise must be a tensor of shape (batch, ...) with batch >= 1, e.g. torch.randn(4, 3, 32, 32)")
    denoiser = as_denoiser(model_fn, schedule, parameterization)
    if getattr(denoiser, "form", "eps") == "mean" and not getattr(fn, "mean_shift_guidance", False):
        raise UserError(f"classifier guidance in mean-shift form needs an ancestral sampler (ddpm), not {name!r}; "
                        "use form='eps' with this sampler")
    if timesteps is not None:
        if grid is not None:
            raise UserError(f"pass either grid={grid!r} or timesteps, not both")
        grid_t = check_grid(torch.as_tensor(timesteps), denoiser.schedule)
    else:
        grid_t = make_grid(denoiser.schedule, steps, grid or DEFAULT_GRIDS.get(name, FALLBACK_GRID))
    source = ProjectedNoise(NoiseSource.from_any(generator, noise.shape[0]), denoiser.space)
    start = denoiser.nfe
    total = expected_nfe(name, len(grid_t) - 1, **options)
    tracked = TrackedDenoiser(denoiser, dict(cond or {}), name, total, progress, callback)
    try:
        x = fn(tracked, noise, grid_t, source, **options)
    finally:
        tracked.close()
    return SampleResult(x, denoiser.nfe - start)


def initial_noise(
    denoiser: Denoiser,
    shape: Sequence[int],
    generator: "torch.Generator | Sequence[torch.Generator] | NoiseSource | None",
    batch: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """x_T of shape (batch, *shape) drawn in the denoiser's space: ``denoiser.space.noise(shape, source)``.

    ``generator`` as in :func:`sample`; with one generator per sample, row i depends only on generator i.
    """
    return denoiser.space.noise(shape, NoiseSource.from_any(generator, batch), dtype=dtype, device=device)
