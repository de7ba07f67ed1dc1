"""Timestep grids: each formula, diffusers' spacings, and every error a user can hit."""

import math

import pytest
import torch
from gmm_fixtures import schedule  # noqa: F401  (fixture)

from difflab.errors import UserError
from difflab.samplers import GRID_KINDS, check_grid, make_grid
from difflab.schedules import NoiseSchedule

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notice inside diffusers


@pytest.mark.parametrize("kind", GRID_KINDS)
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_grid_shape_order_and_ends(schedule, kind, steps):
    t = make_grid(schedule, steps, kind)
    assert t.dtype == torch.float64 and t.shape == (steps + 1,)
    assert bool((t[1:] < t[:-1]).all())
    assert t[-1].item() == -1.0
    if kind != "leading":  # leading starts at (N - 1) floor(T / N), as diffusers
        assert t[0].item() == schedule.t_max


def test_uniform_and_quadratic_formulas(schedule):
    n = 8
    u = torch.arange(n + 1, dtype=torch.float64) / n
    torch.testing.assert_close(make_grid(schedule, n, "uniform"), 999.0 - u * 1000.0)
    torch.testing.assert_close(make_grid(schedule, n, "quadratic"), -1.0 + 1000.0 * (1 - u) ** 2)


def test_logsnr_grid_is_uniform_in_lambda_up_to_t0(schedule):
    t = make_grid(schedule, 9, "logsnr")
    assert t[-2].item() == 0.0
    steps = torch.diff(schedule.lambda_(t[:-1]))
    # float64 lambda differences of O(1): seen 3.7e-16 relative; 1e-12 = 2700x, still fails a non-uniform grid.
    torch.testing.assert_close(steps, torch.full_like(steps, steps.mean().item()), rtol=1e-12, atol=0)


def test_karras_grid_follows_eq5_in_sigma_tilde(schedule):
    t = make_grid(schedule, 9, "karras")
    s = torch.exp(-schedule.lambda_(t[:-1]))
    root = s ** (1 / 7)
    # float64 7th roots and differences: seen 1.3e-15 relative; 1e-12 = 770x.
    torch.testing.assert_close(torch.diff(root), torch.full((8,), torch.diff(root).mean().item(), dtype=torch.float64), rtol=1e-12, atol=0)
    assert math.isclose(s[0].item(), math.exp(-schedule.lambda_(999.0).item()), rel_tol=1e-12)


@pytest.mark.parametrize("kind", ["logsnr", "karras"])
def test_t_min_moves_the_last_noisy_point(schedule, kind):
    t = make_grid(schedule, 6, kind, t_min=20.0)
    assert t[-2].item() == 20.0 and t[-1].item() == -1.0 and bool((t[1:] < t[:-1]).all())


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 3, 10, 16, 50, 1000])
def test_integer_grids_match_diffusers_ddim(schedule, spacing, steps):
    from diffusers import DDIMScheduler

    peer = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=0)
    peer.set_timesteps(steps)
    ours = make_grid(schedule, steps, spacing)
    assert torch.equal(ours[:-1], peer.timesteps.to(torch.float64))


def test_trailing_matches_diffusers_dpm_solver(schedule):
    from diffusers import DPMSolverMultistepScheduler

    peer = DPMSolverMultistepScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    for steps in (7, 20):
        peer.set_timesteps(steps)
        assert torch.equal(make_grid(schedule, steps, "trailing")[:-1], peer.timesteps.to(torch.float64))


def test_bad_steps_and_kinds(schedule):
    for steps in (0, -3, 2.5, True):
        with pytest.raises(UserError, match="steps must be an integer >= 1"):
            make_grid(schedule, steps, "uniform")
    with pytest.raises(UserError, match="unknown grid 'cosine'.*logsnr"):
        make_grid(schedule, 5, "cosine")
    with pytest.raises(UserError, match="t_min applies"):
        make_grid(schedule, 5, "uniform", t_min=10.0)
    with pytest.raises(UserError, match="t_min must lie"):
        make_grid(schedule, 5, "logsnr", t_min=999.0)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_integer_grid_with_more_steps_than_T_names_the_max(spacing):
    small = NoiseSchedule.linear(10)
    assert len(make_grid(small, 10, spacing)) == 11
    with pytest.raises(UserError, match="at most 10 steps"):
        make_grid(small, 11, spacing)


def test_check_grid_errors(schedule):
    assert check_grid(torch.tensor([999.0, 500.0, -1.0]), schedule).dtype == torch.float64
    with pytest.raises(UserError, match="strictly decrease.*t\\[1\\] = 500"):
        check_grid(torch.tensor([999.0, 500.0, 600.0, -1.0]), schedule)
    with pytest.raises(UserError, match="end at the clean end"):
        check_grid(torch.tensor([999.0, 500.0, 0.0]), schedule)
    with pytest.raises(UserError, match="beyond t_max"):
        check_grid(torch.tensor([1500.0, -1.0]), schedule)
    with pytest.raises(UserError, match="at least 2"):
        check_grid(torch.tensor([-1.0]), schedule)
    with pytest.raises(UserError, match="NaN"):
        check_grid(torch.tensor([999.0, float("nan"), -1.0]), schedule)
