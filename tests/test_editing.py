"""Inpainting (replacement, RePaint) and SDEdit over denoisers: exact known entries, RePaint's path and its
reduction to replacement, SDEdit at strength 1 against plain generation, and RePaint against the closed-form
conditional of a Gaussian mixture."""

import pytest
import torch

from difflab.analytic import GaussianMixture
from difflab.editing import inpaint, repaint, repaint_path, sdedit
from difflab.errors import UserError
from difflab.noise import NoiseSource
from difflab.samplers import sample
from difflab.schedules import NoiseSchedule


def seeds(n, base=0):
    return NoiseSource.from_seeds(range(base, base + n))


@pytest.fixture(scope="module")
def image_case():
    """An exact denoiser of 2x4x4 'images' (a mixture over 32 coordinates), an input and a half mask."""
    g = torch.Generator().manual_seed(0)
    mix = GaussianMixture(torch.randn(3, 32, generator=g, dtype=torch.float64), torch.full((3,), 0.3, dtype=torch.float64))
    sched = NoiseSchedule.linear(1000)
    inner = mix.eps_model(sched)
    model = lambda x, t: inner(x.reshape(len(x), -1), t).reshape(x.shape).to(x.dtype)  # noqa: E731
    known = mix.sample(4, torch.Generator().manual_seed(1)).reshape(4, 2, 4, 4).float()
    keep = torch.zeros(4, 4, dtype=torch.bool)
    keep[:, :2] = True  # the left half is known
    return model, sched, known, keep


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m", "unipc", "euler"])
def test_replacement_keeps_known_entries_exactly(image_case, sampler):
    model, sched, known, keep = image_case
    out = inpaint(model, known, keep, sampler, steps=6, schedule=sched, generator=seeds(4))
    assert torch.equal(out.samples[..., :2], known[..., :2])  # max abs error 0
    assert (out.samples[..., 2:] - known[..., 2:]).abs().max() > 1e-3  # the rest was generated, not copied


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_the_replacement_callback_alone_ends_on_the_known_entries(image_case, sampler):
    """Without inpaint()'s final overlay: the callback's replacement at the clean end already restores the known
    entries exactly, so every sampler's last step passes through it."""
    from difflab.editing.inpaint import replacement_callback
    from difflab.samplers import make_grid

    model, sched, known, keep = image_case
    grid = make_grid(sched, 6, "uniform")
    callback = replacement_callback(known, keep.expand_as(known), sched, grid, seeds(4, 9))
    out = sample(model, seeds(4, 9).randn(known.shape[1:]), sampler, timesteps=grid, schedule=sched, generator=seeds(4, 1),
                 callback=callback)
    assert torch.equal(out.samples[..., :2], known[..., :2])


@pytest.mark.parametrize("sampler, options", [("ddpm", {}), ("ddim", {"eta": 0.5})])
def test_repaint_keeps_known_entries_exactly(image_case, sampler, options):
    model, sched, known, keep = image_case
    out = repaint(model, known, keep, steps=8, jump=2, resample=3, schedule=sched, generator=seeds(4), sampler=sampler, **options)
    assert torch.equal(out.samples[..., :2], known[..., :2])
    assert out.nfe == 8 + 2 * 2 * 3  # steps + (resample - 1) jump floor((steps - 1) / jump)


def test_repaint_with_one_resampling_is_replacement(image_case):
    """r = 1, j = 1: RePaint's own loop draws the same noise in the same order as the ddpm sampler plus the
    replacement callback, so the two are bit-equal."""
    model, sched, known, keep = image_case
    a = repaint(model, known, keep, steps=10, jump=1, resample=1, schedule=sched, generator=seeds(4, 7))
    b = inpaint(model, known, keep, "ddpm", steps=10, schedule=sched, generator=seeds(4, 7))
    assert a.nfe == b.nfe == 10 and torch.equal(a.samples, b.samples)


def test_repaint_path_follows_the_paper_schedule():
    path = repaint_path(250, 10, 10)
    downs = sum(b > a for a, b in zip(path, path[1:]))
    # 250 steps, and 9 extra passes over 10 steps at each of the 24 times u = 0, 10, ..., 230
    assert downs == 250 + 9 * 10 * 24 and path[0] == 0 and path[-1] == 250
    assert all(b - a in (1, -10) for a, b in zip(path, path[1:]))
    ups = [a for a, b in zip(path, path[1:]) if b < a]  # the paper's u = 249 - k at every jump
    assert sorted(set(249 - k for k in ups)) == list(range(0, 240, 10)) and all(ups.count(k) == 9 for k in set(ups))
    assert repaint_path(5, 1, 1) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(UserError, match="jump length 10 needs more than 10 steps"):
        repaint_path(10, 10, 2)


def test_sdedit_at_strength_one_is_plain_generation(image_case):
    model, sched, known, _ = image_case
    for sampler in ("ddim", "dpmpp_2m"):
        edited = sdedit(model, known, 1.0, sampler, steps=8, schedule=sched, generator=seeds(4, 3))
        noise = seeds(4, 3).randn(known.shape[1:])
        plain = sample(model, noise, sampler, steps=8, schedule=sched, generator=seeds(4, 3))
        assert edited.nfe == 8 and torch.equal(edited.samples, plain.samples)


def test_sdedit_strength_sets_the_start_and_faithfulness(image_case):
    model, sched, known, _ = image_case
    near = sdedit(model, known, 0.1, "ddim", steps=20, schedule=sched, generator=seeds(4))
    far = sdedit(model, known, 0.9, "ddim", steps=20, schedule=sched, generator=seeds(4))
    assert (near.nfe, far.nfe) == (2, 18)
    assert (near.samples - known).norm() < 0.5 * (far.samples - known).norm()  # low strength stays near the input


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.2])
def test_sdedit_refuses_a_strength_outside_the_unit_interval(image_case, bad):
    model, sched, known, _ = image_case
    with pytest.raises(UserError, match=r"strength must lie in \(0, 1\]"):
        sdedit(model, known, bad, schedule=sched)


def test_bad_masks(image_case):
    model, sched, known, keep = image_case
    with pytest.raises(UserError, match=r"the mask has shape \(5, 4\) but the image has \(4, 2, 4, 4\)"):
        inpaint(model, known, torch.ones(5, 4), schedule=sched)
    with pytest.raises(UserError, match="values other than 0 and 1"):
        inpaint(model, known, torch.full((4, 4), 0.5), schedule=sched)
    with pytest.warns(UserWarning, match="keeps every entry"):
        out = inpaint(model, known, torch.ones(4, 4), schedule=sched)
    assert out.nfe == 0 and torch.equal(out.samples, known)
    with pytest.warns(UserWarning, match="keeps nothing"):
        inpaint(model, known, torch.zeros(4, 4), steps=2, schedule=sched, generator=seeds(4))
    with pytest.raises(UserError, match="multistep solvers"):
        repaint(model, known, keep, schedule=sched, sampler="dpmpp_2m")
    with pytest.raises(UserError, match="eta must lie in \\[0, 1\\]"):
        repaint(model, known, keep, schedule=sched, sampler="ddim", eta=2.0)
    with pytest.raises(UserError, match="unknown option\\(s\\) \\['eta'\\] for RePaint with ddpm"):
        repaint(model, known, keep, schedule=sched, eta=0.5)


def _conditional(mix, known_value):
    """Mean and variance of x_1 given x_0 = known_value under a diagonal 2-D mixture (closed form): component
    weights w_k N(x_0; mu_k0, s_k0^2), then the mixture of the components' x_1 marginals."""
    mu, s, w = mix.means, mix.stds, mix.weights
    logw = torch.log(w) - 0.5 * ((known_value - mu[:, 0]) / s[:, 0]) ** 2 - torch.log(s[:, 0])
    post = torch.softmax(logw, 0)
    mean = (post * mu[:, 1]).sum()
    var = (post * (s[:, 1] ** 2 + mu[:, 1] ** 2)).sum() - mean**2
    return float(mean), float(var)


def test_repaint_recovers_the_closed_form_conditional_and_replacement_does_not(one_thread):
    """Two modes that tie the coordinates together, x_0 = 1.2 known: the missing x_1 given it is N(1.5, 0.09) to
    within 1e-12 (the lower mode's weight). Replacement re-noises x_0 independently of the sampled x_1, so at high
    noise x_1 picks its mode nearly blind; RePaint's resampling lets x_1 follow x_0.

    At the paper's setting (250 steps, jump 10, 10 resamplings) over 2,000 samples: mean within 0.03 (4.5 Monte
    Carlo standard errors of 0.0067) and variance within 25% (RePaint is an approximate conditional sampler:
    seen 13% low, with 3% Monte Carlo error). Replacement at the same 250 steps: seen mean 1.32, variance 0.33.
    """
    mix = GaussianMixture(torch.tensor([[-1.5, -1.5], [1.5, 1.5]], dtype=torch.float64),
                          torch.tensor([0.3, 0.3], dtype=torch.float64))
    sched = NoiseSchedule.linear(1000)
    model = mix.eps_model(sched)
    n = 2000
    known = torch.tensor([[1.2, 0.0]], dtype=torch.float64).expand(n, 2).clone()
    keep = torch.tensor([True, False]).expand(n, 2)
    mean, var = _conditional(mix, 1.2)
    assert abs(mean - 1.5) < 1e-9 and abs(var - 0.09) < 1e-9  # the truth is the upper mode's x_1
    rep = repaint(model, known, keep, steps=250, jump=10, resample=10, schedule=sched, generator=torch.Generator().manual_seed(0))
    plain = inpaint(model, known, keep, "ddpm", steps=250, schedule=sched, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rep.samples[:, 0], known[:, 0]) and torch.equal(plain.samples[:, 0], known[:, 0])
    got, base = rep.samples[:, 1], plain.samples[:, 1]
    assert abs(float(got.mean()) - mean) < 0.03 and abs(float(got.var()) / var - 1) < 0.25
    assert abs(float(base.mean()) - mean) > 0.1 and float(base.var()) > 2 * var  # measurably worse
