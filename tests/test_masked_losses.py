"""Masks in the loss and the likelihoods: a padded batch (padding filled with garbage) gives exactly the
per-sample results of the unpadded samples, computed one sample at a time at its true length."""

import math

import pytest
import torch
from torch import nn

from difflab.denoiser import Denoiser
from difflab.likelihood import ode_log_likelihood, vlb_bits_per_dim
from difflab.losses import diffusion_loss
from difflab.noise import NoiseSource
from difflab.schedules import NoiseSchedule

SCHED = NoiseSchedule.linear(1000)
LENGTHS = [5, 2, 7]
GARBAGE = 1e4

pytestmark = pytest.mark.usefixtures("one_thread")


def _padded(channels_first: bool, seed: int = 0):
    """A ragged batch padded to the longest length with garbage, its mask, and the unpadded samples."""
    g = torch.Generator().manual_seed(seed)
    L, C = max(LENGTHS), 3
    x = torch.full((len(LENGTHS), L, C), GARBAGE)
    mask = torch.zeros(len(LENGTHS), L)
    for i, n in enumerate(LENGTHS):
        x[i, :n] = torch.randn(n, C, generator=g)
        mask[i, :n] = 1
    if channels_first:  # (B, C, L) with mask (B, 1, L)
        return x.transpose(1, 2).contiguous(), mask[:, None], [x[i:i + 1, :n].transpose(1, 2) for i, n in enumerate(LENGTHS)]
    return x, mask, [x[i:i + 1, :n] for i, n in enumerate(LENGTHS)]


class PointNet(nn.Module):
    """A per-entry network on (B, C, L) (kernel-1 convolution): padding cannot leak into real entries."""

    def __init__(self, out_factor: int = 1) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv1d(3, 3 * out_factor, 1)

    def forward(self, x, t):
        return self.conv(x) * (1.0 + t.view(-1, 1, 1) / 1000.0)


def _slice(v: torch.Tensor, i: int, channels_first: bool) -> torch.Tensor:
    return v[i:i + 1, :, :LENGTHS[i]] if channels_first else v[i:i + 1, :LENGTHS[i]]


def test_masked_simple_loss_averages_over_real_entries_only():
    x0, mask, _ = _padded(channels_first=False)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    noise[mask == 0] = GARBAGE
    t = torch.tensor([10, 500, 990])
    net = lambda x, t: torch.tanh(x) * (1 + t.view(-1, 1, 1) / 1000)  # noqa: E731  (elementwise)
    loss = diffusion_loss(net, x0, SCHED, t, noise, mask=mask)
    for i, n in enumerate(LENGTHS):  # by hand: mean over the n * C real entries of (eps_theta - eps)^2
        a, s = SCHED.alpha(t[i].double()).float(), SCHED.sigma(t[i].double()).float()
        x_t = a * x0[i, :n] + s * noise[i, :n]
        expected = (net(x_t[None], t[i:i + 1].float()) - noise[i, :n]).pow(2).mean()
        torch.testing.assert_close(loss[i], expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("parameterization,weighting,loss,learn_variance", [
    ("eps", "uniform", "simple", False),
    ("v", "min_snr", "simple", False),
    ("x0", "uniform", "vlb", False),
    ("eps", "uniform", "hybrid", True),
    ("v", "uniform", "vlb", True),
])
def test_masked_loss_equals_the_dense_loss_of_each_unpadded_sample(parameterization, weighting, loss, learn_variance):
    x0, mask, samples = _padded(channels_first=True)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 300, 999])
    net = PointNet(2 if learn_variance else 1)
    kw = dict(parameterization=parameterization, weighting=weighting, loss=loss, learn_variance=learn_variance)
    parts: dict = {}
    with torch.no_grad():
        padded = diffusion_loss(net, x0, SCHED, t, noise, mask=mask, parts=parts, **kw)
        for i, sample in enumerate(samples):
            dense_parts: dict = {}
            dense = diffusion_loss(net, sample, SCHED, t[i:i + 1], _slice(noise, i, True), parts=dense_parts, **kw)
            torch.testing.assert_close(padded[i:i + 1], dense, rtol=1e-5, atol=1e-7)
            for key, value in dense_parts.items():
                torch.testing.assert_close(parts[key][i:i + 1], value, rtol=1e-5, atol=1e-7)


def test_masked_loss_ignores_nan_in_padding():
    x0, mask, _ = _padded(channels_first=True)
    pad = mask.expand_as(x0) == 0
    x0, noise = x0.masked_fill(pad, math.nan), torch.zeros_like(x0).masked_fill(pad, math.nan)
    t = torch.tensor([0, 2, 3])
    for loss, learn_variance in (("simple", False), ("vlb", True)):
        net = PointNet(1 + learn_variance)
        with torch.no_grad():
            out = diffusion_loss(net, x0, SCHED, t, noise, mask=mask, loss=loss, learn_variance=learn_variance)
            # The truth: each sample's loss on its unpadded entries alone, where no NaN exists.
            dense = torch.cat([diffusion_loss(net, x0[i:i + 1, :, :n], SCHED, t[i:i + 1], noise[i:i + 1, :, :n],
                                              loss=loss, learn_variance=learn_variance) for i, n in enumerate(LENGTHS)])
        # float32 means over <= 3 * max(LENGTHS) entries: padded and dense sums differ only in summation order
        # (a few ulps, ~1e-7 relative); 1e-5 relative leaves a wide margin, NaN leaking in would fail it outright.
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-7)


def _gaussian_eps(scale: float):
    """The exact eps of data N(0, scale^2 I), elementwise: eps = sigma x / (alpha^2 scale^2 + sigma^2)."""

    def eps(x, t):
        t64 = t.to(torch.float64)
        a, s = SCHED.alpha(t64).view(-1, 1, 1), SCHED.sigma(t64).view(-1, 1, 1)
        return (s * x / (a**2 * scale**2 + s**2)).to(x.dtype)

    return eps


def test_masked_ode_likelihood_equals_the_dense_one_and_the_closed_form():
    x, mask, samples = _padded(channels_first=False, seed=4)
    x, samples = x.double(), [s.double() for s in samples]
    den = Denoiser(_gaussian_eps(0.8), SCHED)
    kw = dict(method="euler", steps=40, bins=None)
    padded = ode_log_likelihood(den, x, mask=mask, **kw)
    for i, sample in enumerate(samples):
        dense = ode_log_likelihood(den, sample, **kw)
        torch.testing.assert_close(padded.nats[i:i + 1], dense.nats, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(padded.bits_per_dim[i:i + 1], dense.bits_per_dim, rtol=1e-10, atol=1e-10)
    assert torch.equal(padded.x_end[mask == 0], x[mask == 0])  # the padding does not move
    # adaptive solve against the exact density of x at t_start = 0: N(0, alpha_0^2 0.8^2 + sigma_0^2) per entry
    exact = ode_log_likelihood(den, x, mask=mask, bins=None, rtol=1e-7, atol=1e-7)
    var0 = float(SCHED.alpha(0.0)) ** 2 * 0.64 + float(SCHED.sigma(0.0)) ** 2
    for i, sample in enumerate(samples):
        d = sample.numel()
        nll = 0.5 * (sample.pow(2).sum() / var0 + d * math.log(2 * math.pi * var0))
        # the default prior N(0, I) is q_T only up to alpha_T^2 (1 - 0.64) ~ 1.5e-5 in variance per dimension
        assert abs(exact.nats[i].item() - nll.item()) < 5e-5 * d
        assert abs(exact.bits_per_dim[i].item() - nll.item() / (d * math.log(2))) < 5e-5


def test_masked_hutchinson_counts_only_real_entries():
    """The Gaussian data's Jacobian is c I, so a Rademacher probe (v^T v = D) is exact iff it is 0 on padding."""
    x, mask, _ = _padded(channels_first=False, seed=6)
    den = Denoiser(_gaussian_eps(0.8), SCHED)
    kw = dict(method="euler", steps=20, bins=None, mask=mask)
    exact = ode_log_likelihood(den, x.double(), **kw)
    probed = ode_log_likelihood(den, x.double(), divergence="hutchinson", generator=NoiseSource.from_seeds([0, 1, 2]), **kw)
    torch.testing.assert_close(probed.nats, exact.nats, rtol=1e-10, atol=1e-10)


class SlicedNoise(NoiseSource):
    """Noise that is a function of (sample, entry) only, whatever the padding: each call draws a fresh
    (B, L_max, C) table and returns the rows and leading entries asked for."""

    def __init__(self, rows: list[int]) -> None:
        self.rows, self.calls = rows, 0
        self.generators = [torch.Generator() for _ in rows]

    def randn(self, shape, dtype=torch.float32, device="cpu"):
        table = torch.randn((len(LENGTHS), max(LENGTHS), 3), generator=torch.Generator().manual_seed(self.calls), dtype=dtype)
        self.calls += 1
        return table[self.rows, :shape[0], :shape[1]].to(device)


def test_masked_vlb_equals_the_dense_vlb_of_each_unpadded_sample():
    x, mask, _ = _padded(channels_first=False, seed=5)
    k = ((x.clamp(-1, 1) + 1) * 127.5).round()
    x = torch.where(mask[..., None].bool(), k / 127.5 - 1, x).double()  # 8-bit real entries, garbage padding
    den = Denoiser(_gaussian_eps(0.5), SCHED)
    kw = dict(num_timesteps=20, subset_seed=3, variance="large")
    padded = vlb_bits_per_dim(den, x, mask=mask, generator=SlicedNoise([0, 1, 2]), **kw)
    for i, n in enumerate(LENGTHS):
        dense = vlb_bits_per_dim(den, x[i:i + 1, :n], generator=SlicedNoise([i]), **kw)
        for field in ("nats", "bits_per_dim", "prior", "diffusion", "decoder"):
            torch.testing.assert_close(getattr(padded, field)[i:i + 1], getattr(dense, field), rtol=1e-10, atol=1e-10)
