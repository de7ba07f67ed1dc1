"""Grid tuning (difflab.samplers.tuning) against exact answers on a 2-D Gaussian mixture.

The reference solve must agree with the exact PF-ODE solution; the stick-breaking parametrisation must
round-trip and always give a valid grid; a grid tuned on pilot noise must beat the default grid on
other (held-out) noise at the same NFE, and never be worse than its start on the pilot noise.
"""

import pytest
import torch
from gmm_fixtures import mixture_2d, pf_ode_reference, prior_noise  # noqa: F401

from difflab.denoiser import Denoiser
from difflab.errors import UserError
from difflab.samplers import (
    check_grid,
    get_sampler,
    make_grid,
    optimize_grid,
    reference_solve,
)
from difflab.samplers.tuning import grid_error, grid_from_theta, theta_from_grid
from difflab.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")
SCHEDULE = NoiseSchedule.linear(1000)


@pytest.fixture(scope="module")
def problem():
    mix = mixture_2d()
    den = Denoiser(mix.eps_model(SCHEDULE), SCHEDULE)
    pilot, held_out = prior_noise(64, 2, seed=21), prior_noise(256, 2, seed=22)
    return den, pilot, held_out, pf_ode_reference(mix, SCHEDULE, held_out, SCHEDULE.t_max, -1.0)


def test_reference_solve_is_tight(problem):
    den, _, held_out, exact = problem
    err = (reference_solve(den, held_out, 500) - exact).norm(dim=1).mean()
    assert float(err) < 1e-6


@pytest.mark.parametrize("theta", [[0.0], [-2.0, 1.0, 3.0], [5.0, -5.0, 0.5, 0.5, 9.0]])
def test_theta_round_trip_gives_a_valid_grid(problem, theta):
    den = problem[0]
    grid = grid_from_theta(den, theta)
    check_grid(grid, SCHEDULE)
    assert len(grid) == len(theta) + 2 and grid[0] == SCHEDULE.t_max and grid[-1] == -1.0
    torch.testing.assert_close(torch.tensor(theta_from_grid(den, grid), dtype=torch.float64), torch.tensor(theta, dtype=torch.float64), atol=1e-7, rtol=0)


@pytest.mark.parametrize("sampler,options", [("unipc", {"order": 2}), ("dpmpp_2m", {})])
def test_tuned_grid_beats_the_default_on_held_out_noise(problem, sampler, options):
    den, pilot, held_out, exact = problem
    steps = 5
    tuned = optimize_grid(den, pilot, steps, sampler, reference_steps=100, max_evals=150, **options)
    check_grid(tuned, SCHEDULE)
    assert len(tuned) == steps + 1
    fn = get_sampler(sampler)
    default = grid_error(den, fn, make_grid(SCHEDULE, steps, "logsnr"), held_out, exact, options)
    assert grid_error(den, fn, tuned, held_out, exact, options) < 0.7 * default


def test_bad_input_raises(problem):
    den, pilot, _, _ = problem
    with pytest.raises(UserError):
        optimize_grid(den, pilot, 0)
    with pytest.raises(UserError):
        optimize_grid(den, pilot, 3, reference=pilot[:3])
    with pytest.raises(UserError):
        optimize_grid(den, pilot, 3, "unipc", reference=pilot, ordr=2)
    with pytest.raises(UserError):
        optimize_grid(den, pilot, 3, reference=pilot, start=make_grid(SCHEDULE, 4, "logsnr"))
