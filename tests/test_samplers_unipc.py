"""UniPC (Zhao et al. 2023) against the truth: its phi functions, its order, identities, and diffusers.

1. phi_k(-h) equals its defining integral (numerical quadrature) on both sides of the series switch.
2. Order: on the lambda-uniform grid of tests/test_samplers_convergence.py, UniPC-p converges to the exact
   PF-ODE solution with slope p + 1 in log NFE (the corrector adds one order at no extra NFE).
3. Identities: without the corrector, order 2 bh2 is DPM-Solver++(2M) and order 1 is DPM-Solver++(1).
4. The clean-end step integrates a polynomial eps(s) of degree < k exactly from k samples.
5. Peer: with the same model outputs and without the final-step correction, UniPC equals diffusers'
   UniPCMultistepScheduler (bh1 and bh2, orders 2 and 3, trailing spacing, final sigma zero).
"""

import math

import pytest
import torch
from gmm_fixtures import mixture_2d, pf_ode_reference, prior_noise  # noqa: F401
from scipy.integrate import quad
from test_samplers_convergence import ORDER_STEPS, SCHEDULE, T_END, T_START, lambda_grid

from difflab.denoiser import Denoiser
from difflab.errors import UserError
from difflab.samplers import get_sampler, make_grid, sample
from difflab.samplers._common import point
from difflab.samplers.unipc import clean_end_step, phi, unipc

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("h", [1e-3, 0.3, 0.49, 0.51, 2.0, 7.0])
def test_phi_equals_its_integral(k, h):
    exact, _ = quad(lambda v: math.exp(-h * (1 - v)) * v ** (k - 1) / math.factorial(k - 1), 0.0, 1.0, epsabs=0, epsrel=1e-13)
    # float64 phi_k vs quad at epsrel 1e-13; near h = 1e-3 the series/cancellation costs ~1e-13; 1e-11 leaves 100x.
    assert phi(k, h) == pytest.approx(exact, rel=1e-11)


@pytest.fixture(scope="module")
def ode_problem():
    mix = mixture_2d()
    x = prior_noise(200, 2, seed=3)
    return mix, x, pf_ode_reference(mix, SCHEDULE, x, T_START, T_END)


@pytest.mark.parametrize("order,variant", [(1, "bh1"), (1, "bh2"), (2, "bh1"), (2, "bh2"), (3, "bh2")])
def test_unipc_has_order_p_plus_one(ode_problem, order, variant):
    mix, x, ref = ode_problem
    log_nfe, log_err = [], []
    for n in ORDER_STEPS:
        den = Denoiser(mix.eps_model(SCHEDULE), SCHEDULE)
        y = get_sampler("unipc")(den, x.clone(), lambda_grid(n), None, order=order, variant=variant)
        log_nfe.append(math.log(den.nfe))
        log_err.append(math.log(float((y - ref).norm(dim=1).mean())))
    a = torch.tensor([log_nfe, [1.0] * len(log_nfe)], dtype=torch.float64).T
    slope = -torch.linalg.lstsq(a, torch.tensor(log_err, dtype=torch.float64)[:, None]).solution[0].item()
    errs = [f"{math.exp(e):.2e}" for e in log_err]
    # least-squares slope with pre-asymptotic error; +-0.35 still separates order p + 1 from p and p + 2 (not re-measured here).
    assert abs(slope - (order + 1)) <= 0.35, f"UniPC-{order} {variant}: slope {slope:.2f}, errors {errs}"


@pytest.mark.parametrize("order,peer", [(2, "dpmpp_2m"), (1, "ddim")])
def test_predictor_alone_is_dpm_solver_pp(order, peer):
    model, x = mixture_2d().eps_model(SCHEDULE), prior_noise(32, 2, seed=5)
    grid = make_grid(SCHEDULE, 8, "logsnr")
    ours = unipc(Denoiser(model, SCHEDULE), x.clone(), grid, order, "bh2", corrector=False, corrected_final=False)
    theirs = sample(model, x.clone(), peer, timesteps=grid, schedule=SCHEDULE).samples
    # float64 on both sides: seen 1.9e-15; 1e-12 absorbs op-order differences only.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_clean_end_step_is_exact_for_polynomial_eps(k):
    """dx~/ds = c0 + c1 s + c2 s^2 (degree k - 1) from s_a to 0: x~(0) = x~(s_a) - (c0 s_a + c1 s_a^2/2 + c2 s_a^3/3)."""
    coef = torch.tensor([0.7, -1.3, 2.1][:k], dtype=torch.float64)[:, None] * torch.ones(1, 3, dtype=torch.float64)
    cur = point(SCHEDULE, 30.0)
    nodes = [float(SCHEDULE.sigma(t) / SCHEDULE.alpha(t)) for t in (120.0, 70.0, 30.0)][-k:]
    eps = [(sj, sum(c * sj**q for q, c in enumerate(coef))) for sj in nodes]
    x = torch.tensor([[0.4, -0.2, 1.0]], dtype=torch.float64)
    exact = x / cur.alpha - sum(c * cur.s ** (q + 1) / (q + 1) for q, c in enumerate(coef))
    # float64, a degree <= 2 polynomial integrated exactly, O(1) values: seen 1.1e-16; 1e-13 = 900x.
    torch.testing.assert_close(clean_end_step(x, cur, eps), exact, rtol=0, atol=1e-13)


@pytest.mark.parametrize("order,variant,steps", [(2, "bh2", 8), (2, "bh2", 20), (3, "bh2", 10), (2, "bh1", 20), (3, "bh1", 20)])
def test_matches_diffusers_unipc(order, variant, steps):
    """bh1: diffusers' step into sigma = 0 is NaN (B(h) = h is infinite there), so the state before it is compared,

    with lower_order_final off in both (otherwise dropping the last step would change the order before it).
    """
    from diffusers import UniPCMultistepScheduler

    model, x = mixture_2d().eps_model(SCHEDULE), prior_noise(16, 2, seed=3)
    peer = UniPCMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, solver_order=order,
        solver_type=variant, timestep_spacing="trailing", final_sigmas_type="zero", lower_order_final=variant == "bh2",
    )
    peer.set_timesteps(steps)
    keep = steps if variant == "bh2" else steps - 1
    theirs = x.float().clone()
    for t in peer.timesteps[:keep]:
        theirs = peer.step(model(theirs, t.to(theirs.dtype).expand(len(theirs))), t, theirs).prev_sample
    grid = make_grid(SCHEDULE, steps, "trailing")[: keep + 1]
    ours = unipc(Denoiser(model, SCHEDULE), x.float().clone(), grid, order, variant, variant == "bh2", corrected_final=False)
    # float32 on both sides (diffusers' UniPC runs in float32), multistep with up to 3 terms: seen 7.2e-7; 2e-5 = 28x.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)


def test_nfe_and_clean_end():
    model, x = mixture_2d().eps_model(SCHEDULE), prior_noise(8, 2, seed=1)
    for steps in (1, 2, 5):
        out = sample(model, x.clone(), "unipc", steps, SCHEDULE, order=3)
        assert out.nfe == steps and bool(torch.isfinite(out.samples).all())


@pytest.mark.parametrize("bad", [{"order": 4}, {"variant": "bh3"}])
def test_bad_options_raise(bad):
    with pytest.raises(UserError):
        sample(lambda x, t: torch.zeros_like(x), torch.randn(2, 2), "unipc", 3, SCHEDULE, **bad)
