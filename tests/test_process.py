"""Forward process, posterior and conversions against closed forms."""

import pytest
import torch

from difflab import process as P
from difflab.denoiser import Denoiser, as_denoiser
from difflab.errors import UserError
from difflab.schedules import NoiseSchedule

SCHED = NoiseSchedule.linear(1000)


@pytest.mark.parametrize("kind", ["linear", "cosine", "quadratic"])
def test_one_step_chain_composes_to_closed_form(kind):
    """Composing q(x_t|x_{t-1}) t times gives q(x_t|x_0): mean and variance, exactly."""
    s = getattr(NoiseSchedule, kind)(1000)
    x0 = torch.tensor([0.7], dtype=torch.float64)
    mean, var = x0.clone(), torch.zeros(1, dtype=torch.float64)
    for t in range(1000):
        step = P.q_step(s, mean, torch.tensor([t]))
        mean, var = step.mean, (1 - s.betas[t]) * var + step.var.reshape(1)  # Var[b x + n] = b^2 Var[x] + beta
        if t in (0, 10, 500, 999):
            closed = P.q_marginal(s, x0, torch.tensor([t]))
            # float64, 1000 composed steps (~3 roundings each): seen 4.4e-16 abs; was rtol 1e-10 + default atol 1e-8 (2e7x), tightened to rtol 1e-13, atol 1e-14 (>=20x).
            assert torch.allclose(mean, closed.mean, rtol=1e-13, atol=1e-14)
            # float64 variance recursion over 1000 steps: seen 5.6e-16 abs (2.4e-13 rel on the tiny t=0 value); tightened from rtol 1e-10/atol 1e-8 to rtol 1e-11, atol 1e-14 (>=18x).
            assert torch.allclose(var, closed.var.reshape(1), rtol=1e-11, atol=1e-14)


def test_chain_monte_carlo_matches_q_sample():
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.5, dtype=torch.float64)
    x = x0.clone()
    for t in range(50):
        step = P.q_step(SCHED, x, torch.full((1,), t))
        x = step.mean + step.var.sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
    closed = P.q_marginal(SCHED, x0[:1], torch.tensor([49]))
    se = closed.var.sqrt().item() / 200_000**0.5
    assert abs(x.mean().item() - closed.mean.item()) < 5 * se
    # statistical: n = 2e5 normal draws, se of the sample variance = sqrt(2/n) = 3.2e-3 rel, so 0.02 = 6.3 se (seen 2.7e-5 with this seed).
    assert x.var().item() == pytest.approx(closed.var.item(), rel=0.02)


def test_x_T_is_standard_normal():
    x0 = torch.ones(4, dtype=torch.float64)
    q = P.q_marginal(SCHED, x0, torch.full((4,), 999))
    # schedule property, not roundoff: linear alpha_bar_999 = 4.04e-5 gives mean 6.35e-3 (< 0.01, 1.6x) and |var - 1| = 4.04e-5 (< 1e-4, 2.5x).
    assert q.mean.abs().max() < 0.01 and (q.var - 1).abs().max() < 1e-4


@pytest.mark.parametrize("t", [0, 1, 37, 999])
def test_posterior_equals_bayes_rule(t):
    """q(x_{t-1}|x_t,x_0) from the joint Gaussian by Bayes' rule, 1-D."""
    x0, xt = torch.tensor([0.3], dtype=torch.float64), torch.tensor([-0.4], dtype=torch.float64)
    post = P.discrete_posterior(SCHED, x0, xt, torch.tensor([t]))
    if t == 0:
        # float64, beta-tilde at t=0 is 0 * ... exactly: seen 0.0; 1e-15 ~ 5 eps of O(0.1) inputs.
        assert torch.allclose(post.mean, x0) and post.var.abs().max() < 1e-15  # previous state is clean data
        return
    ab_prev = SCHED.alphas_cumprod[t - 1]
    prior_mean, prior_var = ab_prev.sqrt() * x0, 1 - ab_prev
    b, beta = SCHED.alphas[t].sqrt(), SCHED.betas[t]
    prec = 1 / prior_var + b**2 / beta
    mean = (prior_mean / prior_var + b * xt / beta) / prec
    # float64 Bayes rule (~10 ops): seen 5.0e-15 abs, 2.7e-13 rel; was rtol 1e-9 + default atol 1e-8, tightened to rtol 1e-11, atol 1e-13 (>=20x).
    assert torch.allclose(post.mean, mean, rtol=1e-11, atol=1e-13)
    # float64: seen 2.4e-17 abs, 1.3e-14 rel at var ~0.02; tightened from rtol 1e-9/atol 1e-8 to rtol 1e-12, atol 1e-15 (>=40x).
    assert torch.allclose(post.var.reshape(1), (1 / prec).reshape(1), rtol=1e-12, atol=1e-15)
    # and the textbook coefficients (Ho et al. 2020, eq. 7)
    tilde = (1 - ab_prev) / (1 - SCHED.alphas_cumprod[t]) * beta
    # float64 textbook coefficients (~5 ops): seen 2.8e-14 rel; tightened from 1e-9 to 1e-12 (35x).
    assert post.var.item() == pytest.approx(tilde.item(), rel=1e-12)


def test_p_reverse_variances():
    x = torch.zeros(3, 1, dtype=torch.float64)
    t = torch.tensor([5, 100, 999])
    small = P.p_reverse(SCHED, x, x, t, "small")
    large = P.p_reverse(SCHED, x, x, t, "large")
    ab = SCHED.alphas_cumprod
    tilde = (1 - ab[t - 1]) / (1 - ab[t]) * SCHED.betas[t]
    # float64 over all t (~5 ops each): seen 9.8e-17 abs, 8.3e-14 rel; tightened from rtol 1e-9/atol 1e-8 to rtol 1e-12, atol 1e-15 (>=10x).
    assert torch.allclose(small.var.flatten(), tilde, rtol=1e-12, atol=1e-15)
    # float64, the betas pass through unchanged: seen 0; default atol 1e-8 replaced by 1e-15 (~50 eps at beta ~0.02).
    assert torch.allclose(large.var.flatten(), SCHED.betas[t], rtol=1e-12, atol=1e-15)
    with pytest.raises(UserError):
        P.p_reverse(SCHED, x, x, t, "learned-ish")


def test_conversions_round_trip():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 3.5, 200.0, 700.0, 999.0], dtype=torch.float64)
    a, s = SCHED.alpha(t)[:, None], SCHED.sigma(t)[:, None]
    x = a * x0 + s * eps
    for param in P.PARAMETERIZATIONS:
        target = P.target_for(param, x0, eps, a, s)
        x0b, epsb = P.prediction_to_x0_eps(target, param, x, a, s)
        # float64 round trip target -> (x0, eps) (~6 ops, /sigma at t up to 999): seen 8.7e-15 abs; was atol 1e-8 + default rtol 1e-5, tightened to rtol 1e-12, atol 1e-13 (>=11x).
        assert torch.allclose(x0b, x0, rtol=1e-12, atol=1e-13) and torch.allclose(epsb, eps, rtol=1e-12, atol=1e-13)
    score = P.score_from_eps(eps, s)
    assert torch.allclose(P.eps_from_score(score, s), eps)
    with pytest.raises(UserError):
        P.prediction_to_x0_eps(eps, "score", x, a, s)


def test_denoiser_parameterizations_agree():
    """An eps-, x0-, v- and EDM-model built from the same truth give the same (x0, eps); the EDM network sees
    its input scaled by c_in (Karras et al. 2022) and must undo it to reach the same truth."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 2, generator=g, dtype=torch.float64)
    true_eps = lambda x, t: torch.tanh(x) * (1 + t[:, None] / 1000)  # noqa: E731

    def as_param(param):
        def fn(x, t):
            t64 = t.to(torch.float64)
            a, s = SCHED.alpha(t64)[:, None], SCHED.sigma(t64)[:, None]
            x = x / P.network_input_scale(param, a, s)
            eps = true_eps(x, t64)
            return P.target_for(param, P.x0_from_eps(x, eps, a, s), eps, a, s)
        return fn

    outs = [Denoiser(as_param(p), SCHED, p)(x, 321.5) for p in P.PARAMETERIZATIONS]
    for o in outs[1:]:
        # float64, the parameterizations convert through a few ops: seen 1.1e-16 abs; was atol 1e-6 + default rtol 1e-5, tightened to rtol 1e-14, atol 1e-14 (>=90x).
        assert torch.allclose(o.x0, outs[0].x0, rtol=1e-14, atol=1e-14) and torch.allclose(o.eps, outs[0].eps, rtol=1e-14, atol=1e-14)
    o = outs[0]
    assert torch.allclose(o.score, -o.eps / o.sigma)
    assert torch.allclose(o.v, o.alpha * o.eps - o.sigma * o.x0)


def test_denoiser_counts_and_checks():
    d = as_denoiser(lambda x, t: torch.zeros_like(x), SCHED)
    d(torch.zeros(2, 3), 10.0)
    d(torch.zeros(2, 3), torch.tensor([1.0, 2.0]))
    assert d.nfe == 2 and as_denoiser(d) is d
    with pytest.raises(UserError, match="input's shape"):
        as_denoiser(lambda x, t: x[:, :1], SCHED)(torch.zeros(2, 3), 1.0)
    with pytest.raises(UserError, match="NaN"):
        as_denoiser(lambda x, t: x * float("nan"), SCHED)(torch.zeros(2, 3), 1.0)
    with pytest.raises(UserError, match="schedule"):
        as_denoiser(lambda x, t: x)
    with pytest.raises(UserError, match="parameterization"):
        Denoiser(lambda x, t: x, SCHED, "score")


def test_denoiser_passes_time_in_index_units():
    seen = {}

    def fn(x, t):
        seen["t"] = t
        return torch.zeros_like(x)

    Denoiser(fn, SCHED)(torch.zeros(3, 1), 42.5)
    assert seen["t"].dtype == torch.float32 and seen["t"].tolist() == [42.5] * 3
