"""Shared pieces of the samplers: the schedule at a grid point, the first-order step every solver shares,
and the per-step callback hook (:func:`after_step`).

The probability-flow ODE of the VP SDE (Song et al. 2021b, eq. 13) becomes, in the variables
``x~ = x / alpha`` and ``s = sigma / alpha = exp(-lambda)``, the plain ODE ``dx~/ds = eps(x, t)``
(Song et al. 2021a, eq. 14; Karras et al. 2022, eq. 4 with sigma(t) = t). The clean end ``t = -1`` is
``s = 0`` and ``lambda = +inf``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from torch import Tensor

from difflab.denoiser import DenoiserOutput
from difflab.errors import UserError
from difflab.schedules import NoiseSchedule


class Point(NamedTuple):
    """The schedule at one grid time, as Python floats (float64)."""

    t: float
    alpha: float
    sigma: float
    lam: float

    @property
    def s(self) -> float:
        """sigma~ = sigma / alpha = exp(-lambda), the VE noise level."""
        return self.sigma / self.alpha

    @property
    def clean(self) -> bool:
        """True at the clean end t = -1 (sigma = 0, lambda = +inf)."""
        return self.sigma == 0.0


def point(schedule: NoiseSchedule, t: float) -> Point:
    """alpha, sigma and lambda at time ``t`` (index units)."""
    t = float(t)
    return Point(t, float(schedule.alpha(t)), float(schedule.sigma(t)), float(schedule.lambda_(t)))


def point_at_lambda(schedule: NoiseSchedule, lam: float) -> Point:
    """The grid point whose half log-SNR is ``lam`` (an intermediate point of a singlestep solver)."""
    return point(schedule, float(schedule.t_from_lambda(lam)))


def steps(schedule: NoiseSchedule, timesteps: Tensor) -> Iterator[tuple[int, Point, Point]]:
    """Yield ``(i, current, next)`` for each step of the grid ``t_0 > t_1 > ... > t_N``."""
    pts = [point(schedule, t) for t in timesteps.tolist()]
    for i in range(len(pts) - 1):
        yield i, pts[i], pts[i + 1]


def euler_step(x: Tensor, eps: Tensor, cur: Point, nxt: Point) -> Tensor:
    """One Euler step of dx~/ds = eps: x_next = alpha_next (x / alpha + (s_next - s) eps).

    This is deterministic DDIM (Song et al. 2021a, eq. 13) and DPM-Solver-1 (Lu et al. 2022, eq. 3.7,
    since sigma_next (e^h - 1) = alpha_next (s - s_next)); into the clean end it returns the x0 estimate.
    """
    return nxt.alpha * (x / cur.alpha + (nxt.s - cur.s) * eps)


def check_eta(eta: float) -> None:
    """Raise a UserError unless 0 <= eta <= 1."""
    if not (isinstance(eta, (int, float)) and 0.0 <= float(eta) <= 1.0):
        raise UserError(f"eta must lie in [0, 1], got {eta!r}; use 0 for a deterministic sampler, 1 for full noise")


StepCallback = Callable[[int, Tensor, Tensor], "Tensor | None"]
"""``fn(step, x, denoised) -> Tensor | None``: called after each sampler step (see :func:`after_step`)."""


def after_step(denoiser: Any, i: int, x: Tensor, denoised: Tensor) -> Tensor:
    """End of sampler step ``i``: hand the new state ``x`` and the step's x0 estimate to the callback.

    The callback is the ``callback`` attribute of the denoiser the sampler was given (set by
    :func:`difflab.samplers.sample`); a plain :class:`~difflab.denoiser.Denoiser` has none and ``x`` is
    returned unchanged. A tensor returned by the callback replaces ``x`` (replacement inpainting, RePaint).
    """
    callback = getattr(denoiser, "callback", None)
    if callback is None:
        return x
    new = callback(i, x, denoised)
    if new is None:
        return x
    if not isinstance(new, Tensor) or new.shape != x.shape:
        shape = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
        raise UserError(f"the sampling callback returned {shape} at step {i}; return None or a tensor of x's shape {tuple(x.shape)}")
    return new


class Recording:
    """A denoiser that keeps its first and last outputs (:attr:`first`, :attr:`last`), for step functions
    that return only x."""

    def __init__(self, denoiser: Any) -> None:
        self.denoiser = denoiser
        self.first: DenoiserOutput | None = None
        self.last: DenoiserOutput | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["denoiser"], name)

    def __call__(self, x: Tensor, t: Any) -> DenoiserOutput:
        self.last = self.denoiser(x, t)
        self.first = self.first or self.last
        return self.last

    @property
    def denoised(self) -> Tensor:
        """The x0 estimate of the last evaluation."""
        assert self.last is not None, "no evaluation recorded yet"
        return self.last.x0
