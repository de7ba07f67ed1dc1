"""The per-step callback of ``difflab.sample``: called once per step, in order, and able to replace x
(replacement inpainting), checked on a Gaussian mixture whose conditional is known."""

import pytest
import torch

from difflab.analytic import GaussianMixture
from difflab.denoiser import Denoiser
from difflab.noise import NoiseSource
from difflab.samplers import make_grid, sample, sampler_names
from difflab.schedules import NoiseSchedule

SCHED = NoiseSchedule.linear(1000)
STEPS = 6
ADAPTIVE = {"rk45"}  # the step count is the solver's own
OPTIONS = {"rk45": {"rtol": 1e-3, "atol": 1e-3}}


def _mixture() -> GaussianMixture:
    means = torch.tensor([[-2.0, -2.0], [2.0, 2.0]], dtype=torch.float64)
    return GaussianMixture(means, torch.tensor([0.3, 0.3], dtype=torch.float64))


def _run(name: str, callback=None, seeds=(0, 1, 2), steps=STEPS):
    gmm = _mixture()
    den = Denoiser(gmm.eps_model(SCHED), SCHED)
    x_T = NoiseSource.from_seeds([100 + s for s in seeds]).randn((2,), dtype=torch.float64)
    return sample(den, x_T, name, steps=steps, generator=NoiseSource.from_seeds(seeds), callback=callback,
                  **OPTIONS.get(name, {})).samples


@pytest.mark.parametrize("name", sampler_names())
def test_callback_runs_once_per_step_in_order(name, one_thread):
    calls = []

    def record(i, x, denoised):
        assert denoised.shape == x.shape
        calls.append((i, x.clone()))

    out = _run(name, record)
    indices = [i for i, _ in calls]
    if name in ADAPTIVE:
        assert len(indices) >= 2
    else:
        assert len(indices) == STEPS
    assert indices == list(range(len(indices)))
    assert torch.equal(calls[-1][1], out)  # the last call sees the final sample


@pytest.mark.parametrize("name", sampler_names())
def test_callback_returning_none_changes_nothing(name, one_thread):
    assert torch.equal(_run(name, lambda i, x, d: None), _run(name))


@pytest.mark.parametrize("name", sampler_names())
def test_a_replacing_callback_runs_in_every_sampler(name, one_thread):
    def pin(i, x, denoised):
        x = x.clone()
        x[:, 0] = 0.25
        return x

    out = _run(name, pin)
    assert torch.equal(out[:, 0], torch.full((3,), 0.25, dtype=out.dtype))
    assert bool(torch.isfinite(out).all()) and not torch.equal(out, _run(name))


def _inpaint(name: str, known: torch.Tensor, seeds) -> torch.Tensor:
    """Replacement inpainting of coordinate 0: after step i it is reset to q(x_{t_{i+1}} | x0 = known)."""
    grid = make_grid(SCHED, 25, "uniform")
    noise = NoiseSource.from_seeds([1000 + s for s in seeds])

    def replace(i, x, denoised):
        t_next = grid[i + 1]
        x = x.clone()
        x[:, 0] = SCHED.alpha(t_next) * known + SCHED.sigma(t_next) * noise.randn(()).to(x)
        return x

    return _run(name, replace, seeds=seeds, steps=25)


@pytest.mark.parametrize("name", ["ddim", "euler", "ddpm", "dpmpp_2m", "unipc"])
def test_replacement_callback_fixes_the_known_region(name, one_thread):
    seeds = tuple(range(16))
    known = torch.tensor([2.0, -2.0] * 8, dtype=torch.float64)  # coordinate 0 from either component
    out = _inpaint(name, known, seeds)
    assert torch.equal(out[:, 0], known)
    # the mixture's components are far apart: coordinate 1 follows the component that coordinate 0 picks
    # for most samples; replacement is not exact conditioning (the harmonisation failures RePaint's
    # resampling addresses, Lugmayr et al. 2022, sec. 4.2), so neither all of them nor the N(+-2, 0.3^2) law
    assert (torch.sign(out[:, 1]) == torch.sign(known)).sum() >= 12


def test_callback_with_a_wrong_shape_is_a_user_error(one_thread):
    from difflab.errors import UserError

    with pytest.raises(UserError, match="callback returned"):
        _run("ddim", lambda i, x, d: x[:1])


def test_sampler_called_directly_has_no_callback(one_thread):
    from difflab.samplers import get_sampler

    gmm = _mixture()
    den = Denoiser(gmm.eps_model(SCHED), SCHED)
    x_T = NoiseSource.from_seeds([5, 6]).randn((2,), dtype=torch.float64)
    grid = make_grid(SCHED, STEPS, "uniform")
    direct = get_sampler("ddim")(den, x_T, grid, NoiseSource.from_seeds([0, 1]))
    assert torch.equal(direct, sample(den, x_T, "ddim", timesteps=grid).samples)
