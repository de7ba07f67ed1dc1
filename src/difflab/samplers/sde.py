"""Score-SDE samplers: reverse-time Euler–Maruyama (VP and VE form) and predictor–corrector.

Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential Equations".
Time is the index of :mod:`difflab.schedules`; the VP SDE has f(t) = -beta(t)/2 and g(t)^2 = beta(t)
with beta(t) = -d log alpha_bar / dt. Each step integrates the rate over the step exactly,
``B = integral_{t_next}^{t} beta(u) du = log alpha_bar(t_next) - log alpha_bar(t)``, which is
beta(t) (t - t_next) when beta is constant on the step and stays well defined at the knots where the
piecewise-constant beta of a discrete schedule jumps. Every sampler ends with the denoise step
x0 = D(x, t_{N-1}) (Tweedie's estimate at the last noisy time), so no noise is left at t = -1.
All randomness comes from the :class:`~difflab.noise.NoiseSource`. The callback runs after each of the
N - 1 SDE steps (with the x0 estimate of the step's last evaluation) and after the final denoise step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from difflab.denoiser import Denoiser
from difflab.errors import UserError
from difflab.noise import NoiseSource
from difflab.samplers._common import Recording, after_step
from difflab.samplers.grids import check_grid
from difflab.samplers.registry import register_sampler
from difflab.schedules import CLEAN_T, NoiseSchedule, broadcast_to


def integrated_beta(schedule: NoiseSchedule, t: float, t_next: float) -> float:
    """B = integral of beta over [t_next, t] = log alpha_bar(t_next) - log alpha_bar(t) (> 0)."""
    return float(schedule.log_alpha_bar(t_next) - schedule.log_alpha_bar(t))


def em_vp_step(denoiser: Denoiser, x: Tensor, t: float, t_next: float, noise: NoiseSource) -> Tensor:
    """One reverse VP-SDE Euler–Maruyama step (Song et al. 2021, eq. 6 with eq. 11).

    dx = [-beta/2 x - beta score] dt + sqrt(beta) dw_bar, run backwards from t to t_next:
    x_next = x + B (x/2 + score(x, t)) + sqrt(B) z.
    """
    b = integrated_beta(denoiser.schedule, t, t_next)
    score = denoiser(x, t).score
    return x + b * (0.5 * x + score) + math.sqrt(b) * noise.like(x)


def em_ve_step(denoiser: Denoiser, x: Tensor, t: float, t_next: float, noise: NoiseSource) -> Tensor:
    """One Euler–Maruyama step of the VE form of the process (Song et al. 2021, eq. 9).

    In x~ = x / alpha with sigma~ = sigma / alpha the VP process is the VE SDE
    dx~ = sqrt(d sigma~^2/dt) dw, whose reverse is dx~ = -(d sigma~^2/dt) grad log p~(x~) dt +
    sqrt(d sigma~^2/dt) dw_bar with grad_x~ log p~ = -eps / sigma~. The step, with
    V = sigma~(t)^2 - sigma~(t_next)^2: x~_next = x~ - (V / sigma~(t)) eps(x, t) + sqrt(V) z, then
    x_next = alpha(t_next) x~_next.
    """
    sched = denoiser.schedule
    var_t = float(torch.expm1(-sched.log_alpha_bar(t)))  # sigma~^2 = (1 - alpha_bar) / alpha_bar
    var_next = float(torch.expm1(-sched.log_alpha_bar(t_next)))
    dvar = var_t - var_next
    out = denoiser(x, t)
    x_tilde = x / out.alpha - dvar / math.sqrt(var_t) * out.eps + math.sqrt(dvar) * noise.like(x)
    return float(sched.alpha(t_next)) * x_tilde


def reverse_diffusion_step(denoiser: Denoiser, x: Tensor, t: float, t_next: float, noise: NoiseSource) -> Tensor:
    """Reverse-diffusion predictor (Song et al. 2021, eq. 47 and app. E) for the VP discretisation.

    The forward transition t_next -> t is x_t = sqrt(1 - b) x_{t_next} + sqrt(b) z with
    b = 1 - alpha_bar(t) / alpha_bar(t_next); reversing it: x_next = (2 - sqrt(1 - b)) x + b score + sqrt(b) z.
    """
    b = -math.expm1(-integrated_beta(denoiser.schedule, t, t_next))
    score = denoiser(x, t).score
    return (2.0 - math.sqrt(1.0 - b)) * x + b * score + math.sqrt(b) * noise.like(x)


StepFn = Callable[[Denoiser, Tensor, float, float, NoiseSource], Tensor]
PREDICTORS: dict[str, StepFn] = {"reverse_diffusion": reverse_diffusion_step, "euler_maruyama": em_vp_step}


def _run_steps(step: StepFn, denoiser: Denoiser, x: Tensor, ts: Tensor, noise: NoiseSource) -> Tensor:
    """Apply ``step`` down the grid to the last noisy time, then denoise to the clean end."""
    recorded = Recording(denoiser)
    for i, (t, t_next) in enumerate(zip(ts[:-2].tolist(), ts[1:-1].tolist())):
        x = after_step(denoiser, i, step(recorded, x, t, t_next, noise), recorded.denoised)
    return _denoise(denoiser, x, ts)


def _denoise(denoiser: Denoiser, x: Tensor, ts: Tensor) -> Tensor:
    """The last step, into the clean end: x0 = D(x, t_{N-1}) (its own callback step N - 1)."""
    x0 = denoiser(x, float(ts[-2])).x0
    return after_step(denoiser, len(ts) - 2, x0, x0)


@register_sampler("euler_maruyama")
def euler_maruyama(denoiser: Denoiser, x: Tensor, timesteps: Tensor, noise: NoiseSource) -> Tensor:
    """Reverse VP SDE by Euler–Maruyama (Song et al. 2021, eq. 6, 11); NFE = len(timesteps) - 1."""
    return _run_steps(em_vp_step, denoiser, x, check_grid(timesteps, denoiser.schedule), noise)


@register_sampler("euler_maruyama_ve")
def euler_maruyama_ve(denoiser: Denoiser, x: Tensor, timesteps: Tensor, noise: NoiseSource) -> Tensor:
    """Reverse VE SDE in x~ = x / alpha by Euler–Maruyama (Song et al. 2021, eq. 9); NFE = len(timesteps) - 1."""
    return _run_steps(em_ve_step, denoiser, x, check_grid(timesteps, denoiser.schedule), noise)


def step_alpha(schedule: NoiseSchedule, t: float) -> float:
    """The one-step alpha_i = 1 - beta_i = alpha_bar(t) / alpha_bar(t - 1) (t - 1 clamped at -1)."""
    return math.exp(float(schedule.log_alpha_bar(t) - schedule.log_alpha_bar(max(t - 1.0, CLEAN_T))))


def _norms(v: Tensor, snr_norm: str) -> Tensor:
    """Per-sample L2 norms (B,), or their batch mean broadcast to (B,) for ``snr_norm="batch"``."""
    norms = v.flatten(1).norm(dim=1)
    return norms.mean().expand_as(norms) if snr_norm == "batch" else norms


def langevin_corrector(
    denoiser: Denoiser, x: Tensor, t: float, noise: NoiseSource, n_steps: int, snr: float, snr_norm: str = "expected"
) -> Tensor:
    """Annealed Langevin corrector at fixed t (Song et al. 2021, Alg. 5, VP form).

    x <- x + e g + sqrt(2 e) z with g = score(x, t) and e = 2 alpha_i (snr ||z|| / ||g||)^2. With
    ``snr_norm="expected"`` (default) the norms are their expectations, ||z|| ~ sqrt(D) and
    ||g|| = ||eps|| / sigma_t ~ sqrt(D) / sigma_t, so ||z|| / ||g|| = sigma_t: a state-independent step
    that leaves the target invariant and keeps sample i dependent on seed i only. With ``"sample"`` the
    norms are each sample's own (Alg. 5 as written) and with ``"batch"`` batch means (as in Song et al.'s
    released code, which couples the samples of a batch). A per-sample e(x) ~ 1/||g(x)||^2 makes the
    corrector's stationary law p ||g||^2 instead of p: harmless in high dimension where ||g||
    concentrates, a visible bias in 2-D.
    """
    alpha_i = step_alpha(denoiser.schedule, t)
    for _ in range(n_steps):
        out = denoiser(x, t)
        g = out.score
        z = noise.like(x)
        if snr_norm == "expected":
            ratio = out.sigma.flatten()[:1].expand(x.shape[0])
        else:
            ratio = _norms(z, snr_norm) / _norms(g, snr_norm).clamp_min(1e-30)
        e = broadcast_to(2.0 * alpha_i * (snr * ratio) ** 2, x)
        x = x + e * g + torch.sqrt(2.0 * e) * z
    return x


@register_sampler("pc")
def pc(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    noise: NoiseSource,
    *,
    predictor: str = "reverse_diffusion",
    n_corrector: int = 1,
    snr: float = 0.16,
    snr_norm: str = "expected",
) -> Tensor:
    """Predictor–corrector sampling (Song et al. 2021, Alg. 1; Alg. 5 corrector for VP).

    At every noisy grid time t_i: ``n_corrector`` Langevin steps, then the predictor
    (``"reverse_diffusion"`` or ``"euler_maruyama"``) to t_{i+1}; at the last noisy time the predictor
    is the final denoise to x0. NFE = (len(timesteps) - 1) * (1 + n_corrector). ``snr_norm``:
    ``"expected"`` (default), ``"sample"`` or ``"batch"``, see :func:`langevin_corrector`.
    """
    if predictor not in PREDICTORS:
        raise UserError(f"unknown predictor {predictor!r}; use one of {sorted(PREDICTORS)}")
    if isinstance(n_corrector, bool) or not isinstance(n_corrector, int) or n_corrector < 0:
        raise UserError(f"n_corrector must be an integer >= 0, got {n_corrector!r}")
    if not (isinstance(snr, (int, float)) and math.isfinite(snr) and snr > 0):
        raise UserError(f"snr must be a positive number, got {snr!r}; Song et al. use values like 0.16")
    if snr_norm not in ("expected", "sample", "batch"):
        raise UserError(f"unknown snr_norm {snr_norm!r}; use 'expected' (default), 'sample' (per-sample norms) or 'batch' (batch means)")
    ts = check_grid(timesteps, denoiser.schedule)
    step, recorded = PREDICTORS[predictor], Recording(denoiser)
    for i, (t, t_next) in enumerate(zip(ts[:-2].tolist(), ts[1:-1].tolist())):
        x = langevin_corrector(denoiser, x, t, noise, n_corrector, snr, snr_norm)
        x = after_step(denoiser, i, step(recorded, x, t, t_next, noise), recorded.denoised)
    x = langevin_corrector(denoiser, x, float(ts[-2]), noise, n_corrector, snr, snr_norm)
    return _denoise(denoiser, x, ts)
