"""Samplers: one short function per family over the denoiser contract, a registry by name, time grids.

Importing this package registers every built-in sampler: ddpm, ddim, euler, heun, dpm_solver
(order 1-3), dpm_solver_1/2/3, dpmpp_2m, dpmpp_3m, dpmpp_2m_sde, unipc (order 1-3) (docs/samplers.md), and the
score-SDE / adaptive ones: euler_maruyama, euler_maruyama_ve, pc, rk45.
"""

from difflab.samplers import (  # noqa: F401  (registration)
    adaptive,
    ddim,
    ddpm,
    dpm_solver,
    dpm_solver_pp,
    ode,
    sde,
    unipc,
)
from difflab.samplers.api import DEFAULT_GRIDS, SampleResult, expected_nfe, initial_noise, sample
from difflab.samplers.grids import GRID_KINDS, check_grid, make_grid
from difflab.samplers.registry import (
    get_sampler,
    register_sampler,
    sampler_names,
    sampler_options,
)
from difflab.samplers.tuning import optimize_grid, reference_solve

__all__ = [
    "DEFAULT_GRIDS",
    "GRID_KINDS",
    "SampleResult",
    "check_grid",
    "expected_nfe",
    "get_sampler",
    "initial_noise",
    "make_grid",
    "optimize_grid",
    "reference_solve",
    "register_sampler",
    "sample",
    "sampler_names",
    "sampler_options",
]
