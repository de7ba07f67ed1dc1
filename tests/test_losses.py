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
    torch.testing.assert_close(loss, expected, rtol=2e-4, atol=1e-6)


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
