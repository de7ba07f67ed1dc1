"""Every schedule value against its formula, and the continuous-time view against the discrete one."""

import math

import pytest
import torch

from difflab.errors import UserError
from difflab.schedules import NoiseSchedule


@pytest.mark.parametrize("T", [10, 1000])
def test_linear_betas_match_formula(T):
    s = NoiseSchedule.linear(T, 1e-4, 0.02)
    for t in range(1, T + 1):  # paper index t = 1..T
        expected = 1e-4 + (t - 1) / (T - 1) * (0.02 - 1e-4)
        # float64 affine formula, same ops as the library: seen 0; rel 1e-12 ~ 4500 eps, abs 1e-15 covers betas ~1e-4 (kept: a different op order can cost a few eps).
        assert s.betas[t - 1].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("T", [10, 1000])
def test_quadratic_betas_match_formula(T):
    s = NoiseSchedule.quadratic(T, 1e-4, 0.02)
    for t in range(1, T + 1):
        root = math.sqrt(1e-4) + (t - 1) / (T - 1) * (math.sqrt(0.02) - math.sqrt(1e-4))
        # float64 (sqrt, lerp, square ~4 roundings): seen 1.9e-16 rel; tightened from 1e-12 to 1e-14 (50x).
        assert s.betas[t - 1].item() == pytest.approx(root**2, rel=1e-14)


@pytest.mark.parametrize("T", [10, 1000])
def test_cosine_matches_formula_with_clipping(T):
    s = NoiseSchedule.cosine(T)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in range(1, T + 1):
        beta = min(1 - (f(t / T) / f(0)) / (f((t - 1) / T) / f(0)), 0.999)
        # float64 1 - ratio of cosines cancels for small beta (~1e2x eps amplification): seen 3.2e-14 rel; tightened from 1e-10 to 1e-12 (30x).
        assert s.betas[t - 1].item() == pytest.approx(beta, rel=1e-12, abs=1e-15)
    # Where no clipping happened, alpha_bar is exactly f(t/T)/f(0).
    for t in range(1, T):
        if s.betas[t - 1] < 0.999:
            # float64 cumprod over up to 1000 factors vs the closed form: seen 5.2e-16 rel; tightened from 1e-9 to 5e-14 (~100x).
            assert s.alphas_cumprod[t - 1].item() == pytest.approx(f(t / T) / f(0), rel=5e-14)
    assert s.betas.max().item() <= 0.999


@pytest.mark.parametrize("kind", ["linear", "cosine", "quadratic"])
def test_alpha_bar_is_cumprod_and_tiny_at_T(kind):
    s = getattr(NoiseSchedule, kind)(1000)
    # float64, the same cumprod: seen 0; default atol 1e-8 replaced by 1e-18 (alpha_bar_T is 2.4e-9 for cosine, so an absolute 1e-8 would hide it); rtol 1e-12 ~ 4500 eps.
    assert torch.allclose(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0), rtol=1e-12, atol=1e-18)
    # schedule property: alpha_bar_T = 4.0e-5 linear, 2.4e-9 cosine, 7.3e-4 quadratic (the quadratic one has 1.4x margin under 1e-3).
    assert s.alphas_cumprod[-1].item() < 1e-3  # x_T is ~ N(0, I)


def test_continuous_view_hits_the_knots_and_clean_end():
    s = NoiseSchedule.linear(1000)
    idx = torch.arange(1000, dtype=torch.float64)
    # float64 (sqrt then square): seen 1.1e-16 abs, 1.0e-15 rel; was rtol 1e-12 + default atol 1e-8, tightened to rtol 1e-13, atol 1e-15 (~100x).
    assert torch.allclose(s.alpha(idx) ** 2, s.alphas_cumprod, rtol=1e-13, atol=1e-15)
    # float64 1 - alpha_bar via sigma^2: seen 2.2e-16 abs, 4.4e-16 rel; tightened from rtol 1e-10/atol 1e-8 to rtol 1e-13, atol 1e-15 (>=5x abs, >200x rel).
    assert torch.allclose(s.sigma(idx) ** 2, 1 - s.alphas_cumprod, rtol=1e-13, atol=1e-15)
    assert s.alpha(-1.0).item() == 1.0 and s.sigma(-1.0).item() == 0.0
    assert math.isinf(s.lambda_(-1.0).item())
    # Between knots log alpha_bar is linear in t.
    mid = s.log_alpha_bar(torch.tensor([10.25]))
    lo, hi = math.log(s.alphas_cumprod[10]), math.log(s.alphas_cumprod[11])
    # float64 linear interpolation of two logs (~3 roundings): seen 0; tightened from 1e-12 to 1e-14 (~45 eps).
    assert mid.item() == pytest.approx(lo + 0.25 * (hi - lo), rel=1e-14)


@pytest.mark.parametrize("kind", ["linear", "cosine", "quadratic"])
def test_lambda_inverse_round_trips(kind):
    s = getattr(NoiseSchedule, kind)(1000)
    t = torch.cat([torch.tensor([-0.9, -0.5, 0.0, 0.3]), torch.rand(200, generator=torch.Generator().manual_seed(0)) * 999])
    lam = s.lambda_(t)
    back = s.t_from_lambda(lam)
    # float64 lambda -> t inversion (t up to ~1e3): seen 1.1e-13 abs; was atol 1e-7 + default rtol 1e-5 (~1e-2 at t~1e3), tightened to rtol 1e-14, atol 1e-11 (>=90x).
    assert torch.allclose(back, t.to(torch.float64), rtol=1e-14, atol=1e-11)
    # float64 (log of a ratio, |lambda| up to ~6): seen 8.9e-16 abs; was atol 1e-10 + default rtol 1e-5, tightened to rtol 1e-14, atol 1e-14 (>=11x).
    assert torch.allclose(s.lambda_(t), 0.5 * torch.log(s.alpha(t) ** 2 / s.sigma(t) ** 2), rtol=1e-14, atol=1e-14)


def test_lambda_decreases_with_t():
    s = NoiseSchedule.cosine(1000)
    lam = s.lambda_(torch.linspace(-0.99, 999, 5000, dtype=torch.float64))
    assert (lam.diff() < 0).all()


def test_beta_rate_matches_discrete_beta():
    s = NoiseSchedule.linear(1000)
    # On the segment ending at index i the rate is -log(1 - beta_i) ~ beta_i.
    i = torch.tensor([0, 10, 500, 999])
    rate = s.beta(i.to(torch.float64) - 0.5)
    # float64 continuous rate at a half step vs -log1p(-beta) (betas 1e-4..2e-2): seen 1.4e-13 rel, 4.9e-17 abs; rtol 1e-12 = 7x kept, default atol 1e-8 replaced by 1e-16.
    assert torch.allclose(rate, -torch.log1p(-s.betas[i]), rtol=1e-12, atol=1e-16)


def test_bad_config_errors():
    with pytest.raises(UserError, match="unknown schedule kind"):
        NoiseSchedule.from_config({"kind": "sigmoidal"})
    with pytest.raises(UserError, match="num_timesteps"):
        NoiseSchedule.from_config({"kind": "linear", "num_timesteps": 1})
    with pytest.raises(UserError, match="bad option"):
        NoiseSchedule.from_config({"kind": "linear", "beta_start": 0.1})
    with pytest.raises(UserError, match=r"\(0, 1\)"):
        NoiseSchedule.linear(10, 0.1, 1.5)
    with pytest.raises(UserError, match="time must lie"):
        NoiseSchedule.linear(10).alpha(12.0)


def test_config_round_trip():
    s = NoiseSchedule.cosine(500)
    s2 = NoiseSchedule.from_config(s.to_config())
    assert torch.equal(s.betas, s2.betas)
