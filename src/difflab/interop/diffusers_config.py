"""A diffusers scheduler config in difflab's terms: noise schedule, parameterization and time grid.

A diffusers ``scheduler_config.json`` mixes three things that difflab keeps apart:

* the betas -> :class:`~difflab.schedules.NoiseSchedule`: ``linear`` (Ho et al. 2020), ``scaled_linear``
  (Rombach et al. 2022, Stable Diffusion), ``squaredcos_cap_v2`` (the cosine schedule of Nichol &
  Dhariwal 2021, eq. 17, betas capped at 0.999), or ``trained_betas`` as given;
* ``prediction_type`` -> parameterization: ``epsilon`` -> "eps", ``v_prediction`` -> "v", ``sample`` -> "x0";
* ``timestep_spacing`` and ``steps_offset`` -> the time grid. With N steps and T training steps
  (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", table 2):

  ============  ===========================================  ==============================================
  spacing       DDIM family (samplers ddim, ddpm)            multistep family (every other sampler)
  ============  ===========================================  ==============================================
  linspace      round(linspace(0, T-1, N)), reversed          round(linspace(0, T-1, N+1)), reversed, last dropped
  leading       (N-1-i) floor(T/N) + offset                   (N-i) floor(T/(N+1)) + offset, i = 0..N-1
  trailing      round(T - i T/N) - 1                          the same
  ============  ===========================================  ==============================================

  (the DDIM column is ``DDIMScheduler`` / ``DDPMScheduler``, the other ``DPMSolverMultistepScheduler``
  and ``UniPCMultistepScheduler``). The grid then ends at the clean end t = -1, except where the
  scheduler stops at alpha_bar_0 instead: DDIM with ``set_alpha_to_one: false`` (Stable Diffusion's
  config) and the multistep solvers with ``final_sigmas_type: "sigma_min"``. There the last step lands
  at t = 0 and its (slightly noisy, sigma_0 = sqrt(beta_0)) state is the result; :meth:`SchedulerSpec.sampler`
  reproduces that by running the sampler on the grid with -1 replaced by 0.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from difflab.errors import UserError
from difflab.samplers.grids import check_grid, make_grid
from difflab.samplers.registry import SamplerFn
from difflab.schedules import CLEAN_T, NoiseSchedule

FORMAT = "difflab.scheduler/1"
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
SPACINGS = ("linspace", "leading", "trailing")
DDIM_FAMILY = ("ddim", "ddpm")
# Each diffusers scheduler class's default spacing when its config does not name one.
_DEFAULT_SPACING = {"ddim": "leading", "multistep": "linspace"}
# Options that change how diffusers' own solver steps, not the model: difflab's samplers do not read them.
_SOLVER_ONLY = ("clip_sample", "thresholding", "use_karras_sigmas", "use_lu_lambdas",
                "use_exponential_sigmas", "use_beta_sigmas")
# Options that would change the noise schedule itself in ways difflab does not model.
_UNSUPPORTED = {"rescale_betas_zero_snr": "zero terminal SNR betas (alpha_bar_T = 0)",
                "use_flow_sigmas": "flow-matching sigmas"}


def schedule_from_diffusers(config: dict[str, Any]) -> NoiseSchedule:
    """The :class:`NoiseSchedule` of a diffusers scheduler config (see the module docstring)."""
    T = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        return NoiseSchedule(torch.as_tensor(config["trained_betas"], dtype=torch.float64))
    kind = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if kind == "linear":
        return NoiseSchedule.linear(T, start, end)
    if kind == "scaled_linear":
        return NoiseSchedule.scaled_linear(T, start, end)
    if kind == "squaredcos_cap_v2":
        return NoiseSchedule.cosine(T)
    raise UserError(f"scheduler beta_schedule {kind!r} is not supported; difflab reads linear, scaled_linear, "
                    "squaredcos_cap_v2 or trained_betas")


def parameterization_from_diffusers(prediction_type: str) -> str:
    """difflab's name for a diffusers ``prediction_type``."""
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"scheduler prediction_type {prediction_type!r} is not supported; "
                        f"use one of {', '.join(PREDICTION_TYPES)}")
    return PREDICTION_TYPES[prediction_type]


def sampler_name(sampler: str | SamplerFn) -> str:
    """The registered name of a sampler given by name or as a function ("" for an unregistered callable)."""
    return sampler if isinstance(sampler, str) else getattr(sampler, "sampler_name", "")


def family_of(sampler: str | SamplerFn) -> str:
    """"ddim" for the samplers whose diffusers peer is DDIMScheduler / DDPMScheduler, else "multistep"."""
    return "ddim" if sampler_name(sampler) in DDIM_FAMILY else "multistep"


def diffusers_grid(schedule: NoiseSchedule, steps: int, spacing: str, offset: int = 0, family: str = "multistep") -> Tensor:
    """The ``steps + 1`` grid diffusers' ``set_timesteps`` gives, ending at t = -1 (module docstring table)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
    T, n = schedule.T, steps
    if spacing == "trailing":
        return make_grid(schedule, n, "trailing")
    if spacing == "linspace":
        points = np.linspace(0, T - 1, n if family == "ddim" else n + 1).round()[::-1]
        points = points if family == "ddim" else points[:-1]
    elif spacing == "leading":
        ratio = T // n if family == "ddim" else T // (n + 1)
        points = np.arange(n - 1, -1, -1) * ratio if family == "ddim" else np.arange(n, 0, -1) * ratio
        points = points + offset
    else:
        raise UserError(f"timestep_spacing {spacing!r} is not supported; use one of {', '.join(SPACINGS)}")
    grid = torch.cat([torch.as_tensor(points.copy(), dtype=torch.float64), torch.tensor([CLEAN_T], dtype=torch.float64)])
    return check_grid(grid, schedule, what=f"the {spacing!r} grid with {steps} steps")


def stop_at(fn: SamplerFn, t_end: float) -> SamplerFn:
    """``fn`` run on its grid with the clean end -1 replaced by ``t_end``: the result is the state at ``t_end``.

    When the grid already reaches ``t_end`` the last step is dropped: diffusers' step from alpha_bar_0 to
    alpha_bar_0 leaves the state unchanged (DDIM: x0 and eps re-noised to the same level give back x).
    """

    @functools.wraps(fn)
    def run(denoiser: Any, x: Tensor, timesteps: Tensor, noise: Any, **options: Any) -> Tensor:
        head = timesteps[:-1]
        if float(head[-1]) > t_end:
            head = torch.cat([head, head.new_tensor([t_end])])
        return fn(denoiser, x, head, noise, **options) if len(head) > 1 else x

    return run


@dataclass
class SchedulerSpec:
    """How a model is sampled: its schedule, parameterization and (for diffusers models) grid rules.

    ``timestep_spacing=None`` with ``source="difflab"`` means difflab's default grid per sampler
    (:data:`difflab.samplers.DEFAULT_GRIDS`); with ``source="diffusers"`` the scheduler class's default.
    ``diffusers_config`` keeps the original config so that a folder is written back unchanged.
    """

    schedule: NoiseSchedule
    parameterization: str = "eps"
    timestep_spacing: str | None = None
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    final_sigmas_type: str = "zero"
    source: str = "difflab"
    diffusers_config: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> SchedulerSpec:
        """Read a diffusers ``scheduler_config.json`` dict; unsupported schedule options raise a UserError."""
        for key, what in _UNSUPPORTED.items():
            if config.get(key):
                raise UserError(f"scheduler option {key}=true ({what}) is not supported by difflab; "
                                "use a model trained with a standard VP schedule")
        ignored = [k for k in _SOLVER_ONLY if config.get(k)]
        if ignored:
            warnings.warn(f"scheduler options {ignored} configure diffusers' own solver and are ignored: difflab's "
                          "samplers neither clip nor threshold x0; pick a grid with grid= (e.g. 'karras')",
                          UserWarning, stacklevel=2)
        spacing = config.get("timestep_spacing")
        if spacing is not None and spacing not in SPACINGS:
            raise UserError(f"timestep_spacing {spacing!r} is not supported; use one of {', '.join(SPACINGS)}")
        final = config.get("final_sigmas_type", "zero")
        if final not in ("zero", "sigma_min"):
            raise UserError(f"final_sigmas_type {final!r} is not supported; use 'zero' or 'sigma_min'")
        return cls(schedule_from_diffusers(config), parameterization_from_diffusers(config.get("prediction_type", "epsilon")),
                   spacing, int(config.get("steps_offset", 0)), bool(config.get("set_alpha_to_one", True)), final,
                   "diffusers", dict(config))

    def to_config(self) -> dict[str, Any]:
        """difflab's JSON form (``scheduler/config.json`` of a difflab folder)."""
        return {"format": FORMAT, "schedule": self.schedule.to_config(), "parameterization": self.parameterization,
                "timestep_spacing": self.timestep_spacing, "steps_offset": self.steps_offset,
                "set_alpha_to_one": self.set_alpha_to_one, "final_sigmas_type": self.final_sigmas_type, "source": self.source}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SchedulerSpec:
        """Inverse of :meth:`to_config`."""
        if config.get("format") != FORMAT:
            raise UserError(f"scheduler config has format {config.get('format')!r}, expected {FORMAT!r}; "
                            "re-save the pipeline with save_pretrained")
        rest = {k: v for k, v in config.items() if k not in ("format", "schedule")}
        return cls(NoiseSchedule.from_config(config["schedule"]), **rest)

    def spacing_for(self, sampler: str | SamplerFn) -> str | None:
        """The spacing used for ``sampler``, or None for difflab's default grid."""
        if self.source == "difflab" and self.timestep_spacing is None:
            return None
        return self.timestep_spacing or _DEFAULT_SPACING[family_of(sampler)]

    def timesteps(self, steps: int, sampler: str | SamplerFn) -> Tensor | None:
        """The grid (ending at -1) for ``steps`` steps of ``sampler``; None means difflab's default grid."""
        spacing = self.spacing_for(sampler)
        if spacing is None:
            return None
        return diffusers_grid(self.schedule, steps, spacing, self.steps_offset, family_of(sampler))

    def end_time(self, sampler: str | SamplerFn) -> float:
        """-1 (the clean end), or 0 where the diffusers peer stops at alpha_bar_0 (module docstring)."""
        if self.source != "diffusers":
            return CLEAN_T
        if family_of(sampler) == "ddim":  # DDPMScheduler always ends at alpha_bar = 1
            stops = sampler_name(sampler) == "ddim" and not self.set_alpha_to_one
        else:
            stops = self.final_sigmas_type == "sigma_min"
        return 0.0 if stops else CLEAN_T

    def sampler(self, fn: SamplerFn) -> SamplerFn:
        """``fn`` (a registered sampler function), made to stop at :meth:`end_time` when that is not the clean end."""
        t_end = self.end_time(fn)
        return fn if t_end == CLEAN_T else stop_at(fn, t_end)
