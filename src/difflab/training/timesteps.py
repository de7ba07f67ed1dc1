"""How the trainer draws the timestep t of each training example, and the weight that keeps the loss unbiased.

* ``uniform``: t ~ U{0 .. T-1}, weight 1 (Ho et al. 2020).
* ``importance``: importance sampling of the VLB terms (Nichol & Dhariwal 2021, sec. 3.3, eq. 18):
  p_t ∝ sqrt(E[L_t^2]), E over the last :data:`HISTORY` values of L_t seen at each t; uniform until
  every t has that many. Each draw is weighted by 1 / (T p_t), so E_{t~p}[w_t f(t)] = (1/T) sum_t f(t)
  for any per-timestep loss f: the weighted loss has the expectation of the uniform one.

* ``lognormal``: EDM's noise distribution (Karras et al. 2022, sec. 5): ln s ~ N(P_mean, P_std^2) with
  P_mean = -1.2, P_std = 1.2 for the noise level s = sigma / alpha, mapped to the schedule's continuous
  time t(lambda = -ln s) and clipped to [0, T-1]; weight 1. Times are then fractional.

Draws take a ``torch.Generator`` (the trainer's, seeded by (seed, step)); the state is a dict of tensors
(:meth:`TimestepSampler.state_dict`) so that a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difflab.errors import UserError
from difflab.schedules import NoiseSchedule

HISTORY = 10  # losses kept per timestep (Nichol & Dhariwal 2021, sec. 3.3)
TIMESTEP_SAMPLINGS: tuple[str, ...] = ("uniform", "importance", "lognormal")
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2  # Karras et al. 2022, Table 1 (training noise distribution)


class TimestepSampler:
    """Uniform timesteps; the base of every sampler: :meth:`sample`, :meth:`update`, state round trip."""

    def __init__(self, num_timesteps: int) -> None:
        if num_timesteps < 1:
            raise UserError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps = int(num_timesteps)

    def probabilities(self) -> Tensor:
        """p_t for t = 0 .. T-1 (float64, sums to 1)."""
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``batch`` indices t (int64) and their weights 1 / (T p_t) (float32)."""
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator)
        return t, torch.ones(batch)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-example losses L_t at indices ``t`` (no-op for uniform sampling)."""

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            raise UserError(f"uniform timestep sampling has no state, got keys {sorted(state)}; the checkpoint is of another objective")


class ImportanceSampler(TimestepSampler):
    """p_t ∝ sqrt(mean of the last :data:`HISTORY` L_t^2) once every t has them (Nichol & Dhariwal 2021, sec. 3.3)."""

    def __init__(self, num_timesteps: int) -> None:
        super().__init__(num_timesteps)
        self.history = torch.zeros(self.num_timesteps, HISTORY, dtype=torch.float64)
        self.count = torch.zeros(self.num_timesteps, dtype=torch.int64)  # values ever recorded per t

    @property
    def warm(self) -> bool:
        """True once every timestep has :data:`HISTORY` recorded losses."""
        return bool((self.count >= HISTORY).all())

    def probabilities(self) -> Tensor:
        if not self.warm:
            return super().probabilities()
        rms = self.history.pow(2).mean(1).sqrt()
        total = rms.sum()
        return rms / total if total > 0 else super().probabilities()

    def sample(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if not self.warm:
            return super().sample(batch, generator)
        p = self.probabilities()
        t = torch.multinomial(p, batch, replacement=True, generator=generator)
        return t, (1.0 / (self.num_timesteps * p[t])).float()

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Append each (t, L_t) in order to t's ring buffer of the last :data:`HISTORY` values."""
        t, losses = t.detach().long().cpu().flatten(), losses.detach().double().cpu().flatten()
        if t.shape != losses.shape:
            raise UserError(f"got {t.numel()} timesteps but {losses.numel()} losses; pass one loss per timestep")
        for i, value in zip(t.tolist(), losses.tolist()):
            self.history[i, int(self.count[i]) % HISTORY] = value
            self.count[i] += 1

    def state_dict(self) -> dict[str, Tensor]:
        return {"history": self.history.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        history, count = state.get("history"), state.get("count")
        if history is None or count is None or tuple(history.shape) != tuple(self.history.shape):
            raise UserError(f"importance-sampler state must hold history ({self.num_timesteps}, {HISTORY}) and count; "
                            f"got keys {sorted(state)}; the checkpoint is of another schedule or objective")
        self.history = history.to(torch.float64).clone()
        self.count = count.to(torch.int64).clone()


class LogNormalSampler(TimestepSampler):
    """EDM's log-normal noise levels (Karras et al. 2022, sec. 5) as fractional times of ``schedule``."""

    def __init__(self, schedule: NoiseSchedule, p_mean: float = EDM_P_MEAN, p_std: float = EDM_P_STD) -> None:
        super().__init__(schedule.T)
        self.schedule, self.p_mean, self.p_std = schedule, p_mean, p_std

    def sample(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Fractional times t (float64) with ln(sigma_t / alpha_t) ~ N(P_mean, P_std^2), clipped to the schedule."""
        log_s = self.p_mean + self.p_std * torch.randn(batch, generator=generator, dtype=torch.float64)
        t = self.schedule.t_from_lambda(-log_s).clamp(0, self.num_timesteps - 1)
        return t, torch.ones(batch)


def make_timestep_sampler(name: str, schedule: NoiseSchedule) -> TimestepSampler:
    """The timestep sampler called ``name`` (one of :data:`TIMESTEP_SAMPLINGS`) for ``schedule``."""
    if name == "uniform":
        return TimestepSampler(schedule.T)
    if name == "importance":
        return ImportanceSampler(schedule.T)
    if name == "lognormal":
        return LogNormalSampler(schedule)
    raise UserError(f"unknown timestep sampling {name!r}; use one of {', '.join(TIMESTEP_SAMPLINGS)}")
