"""Loss weightings: each is defined on the x0 error and must agree across parameterizations."""

import pytest
import torch

from difflab.losses import diffusion_loss
from difflab.process import target_for
from difflab.schedules import NoiseSchedule


def _network_predicting(x0_hat: torch.Tensor, schedule: NoiseSchedule, parameterization: str):
    """A 'network' whose output is the ``parameterization`` target implied by a fixed x0 guess."""

    def net(x_t, t, **_):
        a = schedule.alpha(t.double()).float().view(-1, 1, 1, 1)
        s = schedule.sigma(t.double()).float().view(-1, 1, 1, 1)
        eps_hat = (x_t - a * x0_hat) / s
        return target_for(parameterization, x0_hat, eps_hat, a, s)

    return net


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_is_min_snr_times_x0_error_for_every_parameterization(parameterization, gamma):
    """Hang et al. 2023, eq. 9: the min-SNR loss is min(SNR_t, gamma) ||x0 - x0_hat||^2 whatever the target."""
    torch.manual_seed(0)
    schedule = NoiseSchedule.cosine(1000)
    x0, x0_hat = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    t = torch.tensor([0, 20, 150, 400, 800, 999])
    noise = torch.randn_like(x0)
    net = _network_predicting(x0_hat, schedule, parameterization)
    loss = diffusion_loss(net, x0, schedule, t, noise, parameterization=parameterization,
                          weighting="min_snr", min_snr_gamma=gamma)
    snr = (schedule.alpha(t.double()) / schedule.sigma(t.double())) ** 2
    expected = snr.clamp(max=gamma).float() * (x0 - x0_hat).pow(2).flatten(1).mean(1)
    # float32 means over 48 entries (losses up to ~10), SNR from float64 rounded once, eps/v targets converted
    # through 1/sigma or 1/alpha near t = 0 / 999: seen 2.9e-6 abs on the largest losses, 0.12 of this bound (9x).
    torch.testing.assert_close(loss, expected, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_min_snr_v_is_capped_snr_plus_one_times_x0_error(parameterization):
    """min_snr_v: min(SNR_t + 1, gamma) ||x0 - x0_hat||^2, which on the v target is the plain v loss wherever
    SNR + 1 <= gamma (checked directly: ||v - v_hat||^2 with v = alpha eps - sigma x0, Salimans & Ho 2022)."""
    torch.manual_seed(0)
    schedule, gamma = NoiseSchedule.cosine(1000), 5.0
    x0, x0_hat = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    # not t = 999: there alpha = 5e-5, so an eps (or v) output carries the x0 error scaled by 5e-5, below float32's
    # resolution of x_t, and this weight (unlike min-SNR's) keeps full x0 weight there: the check would measure
    # rounding. At t = 900 alpha = 0.15 and SNR + 1 = 1.02 < gamma, the same branch of the cap.
    t = torch.tensor([0, 20, 150, 400, 800, 900])
    noise = torch.randn_like(x0)
    loss = diffusion_loss(_network_predicting(x0_hat, schedule, parameterization), x0, schedule, t, noise,
                          parameterization=parameterization, weighting="min_snr_v", min_snr_gamma=gamma)
    a, s = schedule.alpha(t.double()), schedule.sigma(t.double())
    snr = (a / s) ** 2
    expected = (snr + 1).clamp(max=gamma).float() * (x0 - x0_hat).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss, expected, rtol=2e-6, atol=1e-7)  # the tolerance of the min-SNR test above
    high_noise = snr + 1 <= gamma
    assert high_noise.sum() >= 2 and (~high_noise).sum() >= 2  # both branches of the cap are exercised
    if parameterization == "v":
        a4, s4 = (v.float().view(-1, 1, 1, 1) for v in (a, s))
        eps_hat = (a4 * x0 + s4 * noise - a4 * x0_hat) / s4
        plain_v = (a4 * noise - s4 * x0 - (a4 * eps_hat - s4 * x0_hat)).pow(2).flatten(1).mean(1)
        torch.testing.assert_close(loss[high_noise], plain_v[high_noise], rtol=2e-6, atol=1e-7)


def test_uniform_weighting_is_the_plain_regression_loss():
    torch.manual_seed(1)
    schedule = NoiseSchedule.linear(1000)
    x0, x0_hat, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([5, 500, 990])
    loss = diffusion_loss(_network_predicting(x0_hat, schedule, "eps"), x0, schedule, t, noise)
    a = schedule.alpha(t.double()).float().view(-1, 1, 1, 1)
    s = schedule.sigma(t.double()).float().view(-1, 1, 1, 1)
    eps_hat = (a * x0 + s * noise - a * x0_hat) / s
    torch.testing.assert_close(loss, (noise - eps_hat).pow(2).flatten(1).mean(1))


def test_unknown_weighting_is_a_user_error():
    from difflab.errors import UserError

    with pytest.raises(UserError, match="min_snr"):
        diffusion_loss(lambda x, t: x, torch.zeros(1, 1, 2, 2), NoiseSchedule.linear(10), torch.tensor([3]),
                       torch.zeros(1, 1, 2, 2), weighting="snr")


def test_edm_preconditioning_matches_karras_table_1_in_edm_coordinates():
    """In EDM's own variables y = x_t / alpha, s = sigma / alpha: D(y) = c_skip y + c_out F(c_in y) with
    c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2) (Karras et al. 2022, Table 1)."""
    from difflab.process import EDM_SIGMA_DATA as sd
    from difflab.process import edm_preconditioning, network_input_scale, prediction_to_x0_eps

    schedule = NoiseSchedule.cosine(1000)
    t = torch.tensor([0.0, 10.0, 300.0, 700.0, 999.0], dtype=torch.float64)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    s = sigma / alpha
    x_t, f = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    y = x_t / alpha
    c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt()
    x0, _ = prediction_to_x0_eps(f, "edm", x_t, alpha, sigma)
    torch.testing.assert_close(x0, c_skip * y + c_out * f)
    torch.testing.assert_close(x_t * network_input_scale("edm", alpha, sigma), c_in * y)
    assert network_input_scale("v", alpha, sigma) == 1.0
    vp_skip, vp_out, _ = edm_preconditioning(alpha, sigma)
    torch.testing.assert_close(vp_out, c_out)
    torch.testing.assert_close(vp_skip * alpha, c_skip)


def test_edm_target_inverts_the_prediction_and_is_minus_v_for_unit_data_std():
    from difflab.process import edm_target, prediction_to_x0_eps, v_from_x0_eps

    schedule = NoiseSchedule.cosine(1000)
    t = torch.tensor([0.0, 50.0, 500.0, 999.0], dtype=torch.float64)
    a, s = schedule.alpha(t), schedule.sigma(t)
    x0, eps = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    x_t = a * x0 + s * eps
    x0_back, eps_back = prediction_to_x0_eps(target_for("edm", x0, eps, a, s), "edm", x_t, a, s)
    torch.testing.assert_close(x0_back, x0)
    torch.testing.assert_close(eps_back[1:], eps[1:])  # at t = 0 eps is ill-determined (sigma ~ 0)
    torch.testing.assert_close(edm_target(x0, eps, a, s, sigma_data=1.0), -v_from_x0_eps(x0, eps, a, s))


def test_edm_loss_is_karras_weighted_x0_error_through_the_denoiser():
    """Uniform weighting on F is EDM's lambda(s) = 1 / c_out^2 on the x0 error; the Denoiser applies c_in to its input."""
    from difflab.denoiser import Denoiser
    from difflab.process import EDM_SIGMA_DATA as sd

    torch.manual_seed(2)
    schedule = NoiseSchedule.cosine(1000)
    seen = {}

    def net(x, t, **_):
        seen["x"] = x
        return 0.3 * x

    x0, noise = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    t = torch.tensor([3.5, 100.0, 400.25, 900.0])
    loss = diffusion_loss(net, x0, schedule, t, noise, parameterization="edm")
    a = schedule.alpha(t.double()).float().view(-1, 1, 1, 1)
    s = schedule.sigma(t.double()).float().view(-1, 1, 1, 1)
    x_t = a * x0 + s * noise
    torch.testing.assert_close(seen["x"], x_t / (s**2 + a**2 * sd**2).sqrt())
    x0_hat = Denoiser(net, schedule, "edm")(x_t, t).x0
    c_out2 = (s**2 * sd**2 / (s**2 + a**2 * sd**2)).flatten()
    # float32, 9 entries per sample, EDM scalings c_in / c_out computed in float32 (a few roundings of 6e-8 each,
    # divided by c_out^2 which is small at t = 3.5): seen 1.7e-6 abs / 6.9e-7 rel; 1e-5 rel is ~15x that.
    torch.testing.assert_close(loss, (x0 - x0_hat).pow(2).flatten(1).mean(1) / c_out2, rtol=1e-5, atol=1e-6)


def test_lognormal_timesteps_follow_edm_noise_distribution():
    from difflab.training.timesteps import EDM_P_MEAN, EDM_P_STD, make_timestep_sampler

    schedule = NoiseSchedule.cosine(1000)
    t, w = make_timestep_sampler("lognormal", schedule).sample(20000, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 999 and torch.equal(w, torch.ones(20000))
    log_s = (schedule.sigma(t) / schedule.alpha(t)).log()
    inside = (t > 0) & (t < 999)  # clipping only touches the far tails
    assert inside.float().mean() > 0.99
    assert abs(log_s[inside].mean().item() - EDM_P_MEAN) < 0.03 and abs(log_s[inside].std().item() - EDM_P_STD) < 0.03


def test_nan_network_output_reaches_the_loss_for_the_nan_guard():
    """The loss evaluates the network through a Denoiser without its finiteness check: the trainer's guard decides."""
    x0 = torch.zeros(2, 1, 2, 2)
    loss = diffusion_loss(lambda x, t: x * float("nan"), x0, NoiseSchedule.linear(10), torch.tensor([1, 2]), x0)
    assert bool(torch.isnan(loss).all())
