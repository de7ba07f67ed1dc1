"""Sampler registry: names in configs and on the command line map to functions without if-chains.

A sampler is a short function over a denoiser and an explicit, decreasing time grid that ends at the
clean end ``t = -1`` (see :mod:`difflab.schedules`)::

    @register_sampler("ddim")
    def ddim(denoiser: Denoiser, x: Tensor, timesteps: Tensor, noise: NoiseSource, *, eta: float = 0.0) -> Tensor

``timesteps`` is a float64 tensor ``t_0 > t_1 > ... > t_N = -1`` in index units; ``noise`` draws
per-sample Gaussian noise for stochastic samplers. The function returns the final sample.

Each step ends with :func:`difflab.samplers._common.after_step`, which hands ``(i, x, x0)`` to the
``callback`` attribute of the denoiser (set by :func:`difflab.samplers.sample`; a plain ``Denoiser``
has none, so a sampler called directly runs unchanged).

Per-sample times: the denoiser and every schedule lookup accept ``t`` of shape (B,), but every sampler
here runs one grid for the whole batch. The first-order one-step samplers (``ddim``, ``ddpm``,
``euler``) are the ones that can take a per-sample start time (e.g. an SDEdit strength per sample) by
carrying (B,) tensors instead of the floats of :class:`~difflab.samplers._common.Point`; the multistep
(``dpmpp_*``, ``unipc``), singlestep (``dpm_solver*``, ``heun``), score-SDE and ``rk45`` samplers share
their step sizes and histories across the batch and do not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from difflab.errors import UserError

SamplerFn = Callable[..., Tensor]
_SAMPLERS: dict[str, SamplerFn] = {}


def register_sampler(name: str, *, mean_shift_guidance: bool = False) -> Callable[[SamplerFn], SamplerFn]:
    """Decorator that registers a sampler function under ``name``.

    ``mean_shift_guidance``: the sampler applies a denoiser's ``ancestral_shift`` (classifier guidance in
    the mean-shift form of Dhariwal & Nichol 2021, Alg. 1) to the mean of each stochastic step.
    """

    def decorate(fn: SamplerFn) -> SamplerFn:
        if name in _SAMPLERS:
            raise ValueError(f"sampler {name!r} is registered twice")
        _SAMPLERS[name] = fn
        fn.sampler_name = name  # type: ignore[attr-defined]
        fn.mean_shift_guidance = mean_shift_guidance  # type: ignore[attr-defined]
        return fn

    return decorate


def get_sampler(name: "str | SamplerFn") -> SamplerFn:
    """Look a sampler up by name (or pass a function through)."""
    if callable(name):
        return name
    if name not in _SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; valid names: {', '.join(sorted(_SAMPLERS))}")
    return _SAMPLERS[name]


def sampler_names() -> list[str]:
    return sorted(_SAMPLERS)


def sampler_options(name: str) -> dict[str, Any]:
    """The keyword options a sampler accepts, with their defaults."""
    import inspect

    sig = inspect.signature(get_sampler(name))
    return {k: p.default for k, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}
