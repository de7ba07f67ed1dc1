"""Score-SDE samplers and the adaptive rk45 PF-ODE solver against a Gaussian mixture's exact answers."""

import math

import numpy as np
import pytest
import torch
from gmm_fixtures import mixture_2d, pf_ode_reference, prior_noise, sliced_wasserstein
from scipy.integrate import solve_ivp

from difflab.denoiser import Denoiser
from difflab.errors import UserError
from difflab.noise import NoiseSource
from difflab.samplers import adaptive, make_grid, sde
from difflab.schedules import NoiseSchedule

SCHED = NoiseSchedule.linear(1000)
N = 4000  # samples per set for the distribution tests
N_REFS = 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _denoiser(mixture=None) -> Denoiser:
    mixture = mixture or mixture_2d()
    return Denoiser(mixture.eps_model(SCHED), SCHED)


def _shared_noise(seed: int, n: int) -> NoiseSource:
    return NoiseSource.from_any(torch.Generator().manual_seed(seed), n)


@pytest.fixture(scope="module")
def refs():
    return [mixture_2d().sample(N, torch.Generator().manual_seed(500 + i)) for i in range(N_REFS)]


def _mean_sw(x, refs) -> float:
    return sum(sliced_wasserstein(x, r, n_projections=128) for r in refs) / len(refs)


@pytest.fixture(scope="module")
def floor_threshold(refs):
    """Mean + 3 std of the same statistic for independent exact sample sets of the same size."""
    vals = torch.tensor([_mean_sw(mixture_2d().sample(N, torch.Generator().manual_seed(900 + i)), refs) for i in range(6)])
    return float(vals.mean() + 3 * vals.std())


# PC with expected (default) or batch-mean norms: in 2-D, per-sample norms make the Langevin step
# ~ 1/||score(x)||^2, whose stationary law is p ||score||^2, not p (see sde.langevin_corrector); that
# mode is tested for seeding only.
SDE_CASES = [
    ("euler_maruyama", sde.euler_maruyama, {}),
    ("euler_maruyama_ve", sde.euler_maruyama_ve, {}),
    ("pc_expected_norms", sde.pc, {}),
    ("pc_reverse_diffusion", sde.pc, {"snr_norm": "batch"}),
    ("pc_euler_maruyama", sde.pc, {"snr_norm": "batch", "predictor": "euler_maruyama"}),
]


@pytest.mark.parametrize("name,fn,options", SDE_CASES, ids=[c[0] for c in SDE_CASES])
def test_sde_sampler_converges_to_mixture(name, fn, options, refs, floor_threshold):
    """5 steps are far from the mixture; 100 steps are within the exact-vs-exact noise floor."""
    x_T = prior_noise(N, 2, seed=10)
    coarse = fn(_denoiser(), x_T, make_grid(SCHED, 5), _shared_noise(0, N), **options)
    fine = fn(_denoiser(), x_T, make_grid(SCHED, 100), _shared_noise(0, N), **options)
    sw_coarse, sw_fine = _mean_sw(coarse, refs), _mean_sw(fine, refs)
    assert sw_coarse > floor_threshold, (sw_coarse, floor_threshold)
    assert sw_fine < floor_threshold, (sw_fine, floor_threshold)


def test_rk45_converges_to_mixture(refs, floor_threshold):
    """A loose tolerance is far from the mixture; rtol = 1e-5 is within the noise floor."""
    x_T = prior_noise(N, 2, seed=10)
    loose = adaptive.rk45(_denoiser(), x_T, make_grid(SCHED, 10), rtol=0.1, atol=0.1)
    tight = adaptive.rk45(_denoiser(), x_T, make_grid(SCHED, 10), rtol=1e-5, atol=1e-5)
    assert _mean_sw(loose, refs) > floor_threshold
    assert _mean_sw(tight, refs) < floor_threshold


def test_nfe_counts():
    """EM: one evaluation per step; PC: (1 + n_corrector) per step; rk45: the solver's calls + 1."""
    x, grid = prior_noise(16, 2, 1), make_grid(SCHED, 12)
    for fn, options, expected in [
        (sde.euler_maruyama, {}, 12),
        (sde.euler_maruyama_ve, {}, 12),
        (sde.pc, {"n_corrector": 2}, 12 * 3),
        (sde.pc, {"n_corrector": 0}, 12),
    ]:
        d = _denoiser()
        fn(d, x, grid, _shared_noise(0, 16), **options)
        assert d.nfe == expected, (fn.__name__, options)
    d = _denoiser()
    sol = adaptive.solve_pf_ode(d, x, float(grid[0]), 0.0, rtol=1e-4, atol=1e-4)  # rk45's default t_end
    iters = int((sol.accepted + sol.rejected).max())
    assert sol.nfev == d.nfe == 2 + 6 * iters
    d = _denoiser()
    adaptive.rk45(d, x, grid, rtol=1e-4, atol=1e-4)
    assert d.nfe == sol.nfev + 1


@pytest.mark.parametrize("fn,options", [(sde.euler_maruyama, {}), (sde.euler_maruyama_ve, {}), (sde.pc, {}), (adaptive.rk45, {})])
def test_sample_depends_only_on_its_seed(fn, options):
    """With one generator per sample, sample 2 is the same alone and inside a batch (rk45: per-sample steps)."""
    x = prior_noise(3, 2, 4)
    grid = make_grid(SCHED, 8)
    batch = fn(_denoiser(), x, grid, NoiseSource.from_seeds([7, 8, 9]), **options)
    alone = fn(_denoiser(), x[2:], grid, NoiseSource.from_seeds([9]), **options)
    # float64, per-sample step control makes the batched rows identical to solo runs (seen 0); 1e-12 = reordering ulps.
    torch.testing.assert_close(batch[2:], alone, rtol=1e-12, atol=1e-12)


def test_em_ve_is_the_vp_process_in_x_over_alpha():
    """With z = 0 and a single step the VE step equals its equation: x~' = x~ - V eps / sigma~, x' = alpha' x~'."""
    d, x = _denoiser(), prior_noise(5, 2, 2)
    zero = NoiseSource([torch.Generator()] * 5)
    zero.like = lambda v: torch.zeros_like(v)  # deterministic part only
    t, t_next = 400.0, 300.0
    out = d(x, t)
    s, s_next = float(SCHED.sigma(t) / SCHED.alpha(t)), float(SCHED.sigma(t_next) / SCHED.alpha(t_next))
    expected = float(SCHED.alpha(t_next)) * (x / out.alpha - (s**2 - s_next**2) / s * out.eps)
    # float64, one Euler-Maruyama step by hand: seen 4.4e-16; 1e-12 = 2000x ulps of O(1) values.
    torch.testing.assert_close(sde.em_ve_step(d, x, t, t_next, zero), expected, rtol=1e-12, atol=1e-12)


# ----- the adaptive integrator ---------------------------------------------------------------
def _f_np(s, y):
    return np.array([-2 * y[0] + np.sin(3 * s) * y[1], y[0] - 0.5 * y[1] ** 2 + np.cos(s)])


def _f_torch(y, s):
    s = s[:, None]
    return torch.cat([-2 * y[:, :1] + torch.sin(3 * s) * y[:, 1:], y[:, :1] - 0.5 * y[:, 1:] ** 2 + torch.cos(s)], 1)


@pytest.mark.parametrize("tol", [1e-3, 1e-6, 1e-9])
def test_dopri5_matches_scipy_rk45_step_for_step(tol):
    """Same tableau and controller as scipy's RK45: same number of calls, same end state."""
    y0 = np.array([1.0, 0.5])
    ref = solve_ivp(_f_np, (0.0, 5.0), y0, method="RK45", rtol=tol, atol=tol)
    sol = adaptive.dopri5(_f_torch, torch.tensor(y0)[None], 0.0, 5.0, rtol=tol, atol=tol)
    assert sol.nfev == ref.nfev
    assert int(sol.accepted) == len(ref.t) - 1
    # float64, the same tableau and accepted steps as scipy: only op-order roundings differ over <= a few hundred steps.
    np.testing.assert_allclose(sol.y[0].numpy(), ref.y[:, -1], rtol=1e-12, atol=1e-12)


def test_dopri5_per_sample_intervals_and_directions():
    """Each sample integrates its own interval (forward or backward) as if alone."""
    y0 = torch.tensor([[1.0, 0.5], [2.0, 1.0]], dtype=torch.float64)
    sol = adaptive.dopri5(_f_torch, y0, torch.tensor([0.0, 3.0]), torch.tensor([2.0, 1.0]), rtol=1e-8, atol=1e-8)
    for i, (a, b) in enumerate([(0.0, 2.0), (3.0, 1.0)]):
        ref = solve_ivp(_f_np, (a, b), y0[i].numpy(), method="RK45", rtol=1e-8, atol=1e-8)
        # float64, step-for-step identical to scipy: op-order roundings only.
        np.testing.assert_allclose(sol.y[i].numpy(), ref.y[:, -1], rtol=1e-12, atol=1e-12)
        assert int(sol.accepted[i]) == len(ref.t) - 1


def test_dopri5_is_fifth_order():
    """With fixed steps (rtol huge), halving h cuts the error of y' = y cos s by about 2^5."""
    def f(y, s):
        return y * torch.cos(s)[:, None]

    exact = math.exp(math.sin(2.0))
    errs = []
    for h in (0.2, 0.1):
        y, s = torch.ones(1, 1, dtype=torch.float64), 0.0
        for _ in range(round(2.0 / h)):
            y = adaptive.dopri5(f, y, s, s + h, rtol=1e6, atol=1e6, h_init=h).y
            s += h
        errs.append(abs(float(y) - exact))
    # fifth order: halving h divides the error by 2^5; +-0.5 in the exponent absorbs the O(h^6) term (float64 errors ~1e-9, far above roundoff).
    assert 2**4.5 < errs[0] / errs[1] < 2**5.5


def test_rk45_reaches_the_reference_pf_ode_solution():
    """Against scipy DOP853 at 1e-11 in sigma/alpha: error within a small multiple of the tolerance,
    shrinking as the tolerance tightens, and NFE falling as rtol loosens."""
    g, x = mixture_2d(), prior_noise(64, 2, 3)
    ref = pf_ode_reference(g, SCHED, x, 999.0, 0.0)
    nfes, errs = [], []
    for tol in (1e-7, 1e-5, 1e-3):
        d = _denoiser(g)
        y = adaptive.solve_pf_ode(d, x, 999.0, 0.0, rtol=tol, atol=tol).y
        scaled = ((y - ref).abs() / (tol + tol * ref.abs())).max().item()
        nfes.append(d.nfe)
        errs.append((y - ref).abs().max().item())
        if tol < 1e-3:  # at 1e-3 a trajectory near the boundary between modes may switch mode
            # error in units of the requested tolerance (atol + rtol |y|): local error control keeps the global error a small multiple; 10x.
            assert scaled < 10, (tol, scaled)
    assert nfes[0] > nfes[1] > nfes[2]
    # tolerance tightened 100x: the global error must fall by at least 10x.
    assert errs[0] < errs[1] / 10


# ----- bad options ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fn,options",
    [
        (sde.pc, {"snr": 0.0}),
        (sde.pc, {"snr": -0.1}),
        (sde.pc, {"n_corrector": -1}),
        (sde.pc, {"n_corrector": 1.5}),
        (sde.pc, {"predictor": "heun"}),
        (sde.pc, {"snr_norm": "pixel"}),
        (adaptive.rk45, {"rtol": 0.0}),
        (adaptive.rk45, {"atol": -1e-5}),
        (adaptive.rk45, {"rtol": float("nan")}),
        (adaptive.rk45, {"t_end": -1.0}),
    ],
)
def test_bad_options_raise_user_error(fn, options):
    with pytest.raises(UserError):
        fn(_denoiser(), prior_noise(2, 2, 0), make_grid(SCHED, 4), _shared_noise(0, 2), **options)


def test_bad_grid_raises_user_error():
    with pytest.raises(UserError):
        sde.euler_maruyama(_denoiser(), prior_noise(2, 2, 0), torch.tensor([999.0, 500.0]), _shared_noise(0, 2))
