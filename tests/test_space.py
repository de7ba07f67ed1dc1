"""The denoiser's Space: per-sample noise, projection in the samplers, dimension counts with masks;
and per-sample times in the denoiser."""

import pytest
import torch

from difflab.analytic import GaussianMixture
from difflab.denoiser import Denoiser
from difflab.errors import UserError
from difflab.guidance import CFGDenoiser
from difflab.noise import NoiseSource
from difflab.samplers import initial_noise, sample
from difflab.schedules import NoiseSchedule
from difflab.space import ProjectedNoise, Space

SCHED = NoiseSchedule.linear(1000)


class ZeroMean(Space):
    """Zero mean over the first axis of each sample (centre of mass of a point set), padding excluded."""

    def project(self, x, mask=None):
        m = torch.ones(x.shape[:2], dtype=x.dtype) if mask is None else mask.to(x.dtype)
        m = m.reshape(*m.shape, *([1] * (x.ndim - 2)))
        mean = (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)
        return x - mean * m


def test_noise_row_i_depends_only_on_seed_i():
    space = Space()
    batch = space.noise((3, 4), NoiseSource.from_seeds([7, 8, 9]))
    alone = space.noise((3, 4), NoiseSource.from_seeds([8]))
    assert batch.shape == (3, 3, 4)
    assert torch.equal(batch[1:2], alone)
    assert torch.equal(batch, NoiseSource.from_seeds([7, 8, 9]).randn((3, 4)))  # default: plain N(0, I)


def test_a_subclass_projects_the_noise_and_the_sampler_draws():
    space = ZeroMean()
    x = space.noise((5, 3), NoiseSource.from_seeds([0, 1]), dtype=torch.float64)
    # float64 mean over 5 entries after projecting out the mean (~10 roundings of O(1) values): seen 1.8e-16; tightened from 1e-12 to 1e-14 (56x).
    torch.testing.assert_close(x.mean(1), torch.zeros(2, 3, dtype=torch.float64), atol=1e-14, rtol=0)
    drawn = ProjectedNoise(NoiseSource.from_seeds([0, 1]), space).like(x)
    # float64, same projection: seen 1.8e-16; tightened from 1e-12 to 1e-14 (56x).
    torch.testing.assert_close(drawn.mean(1), torch.zeros(2, 3, dtype=torch.float64), atol=1e-14, rtol=0)
    torch.testing.assert_close(drawn, x)


def test_samplers_draw_their_noise_through_the_space(one_thread):
    calls = []

    class Counting(Space):
        def project(self, x, mask=None):
            calls.append(x.shape)
            return x

    gmm = GaussianMixture(torch.zeros(1, 2), torch.ones(1))
    plain = Denoiser(gmm.eps_model(SCHED), SCHED)
    counted = Denoiser(gmm.eps_model(SCHED), SCHED, space=Counting())
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    kw = dict(steps=5, generator=NoiseSource.from_seeds([1, 2, 3]))
    a = sample(plain, x_T, "ddpm", **kw).samples
    b = sample(counted, x_T, "ddpm", steps=5, generator=NoiseSource.from_seeds([1, 2, 3])).samples
    assert torch.equal(a, b) and len(calls) == 4  # one draw per noisy step


def test_initial_noise_uses_the_denoisers_space():
    den = Denoiser(lambda x, t: x, SCHED, space=ZeroMean())
    x_T = initial_noise(den, (4, 3), [torch.Generator().manual_seed(s) for s in (3, 4)], 2, dtype=torch.float64)
    assert x_T.shape == (2, 4, 3)
    # float64, same projection over 4 entries: seen 5.6e-17; tightened from 1e-12 to 1e-14 (180x, kept with the two above).
    torch.testing.assert_close(x_T.mean(1), torch.zeros(2, 3, dtype=torch.float64), atol=1e-14, rtol=0)
    plain = initial_noise(Denoiser(lambda x, t: x, SCHED), (4, 3), NoiseSource.from_seeds([3, 4]), 2)
    assert torch.equal(plain, NoiseSource.from_seeds([3, 4]).randn((4, 3)))


def test_num_dims_counts_real_entries():
    space = Space()
    x = torch.zeros(3, 5, 2)
    assert space.num_dims(x).tolist() == [10.0, 10.0, 10.0]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert space.num_dims(x, mask).tolist() == [6.0, 10.0, 2.0]  # entries times the trailing axis
    audio = torch.zeros(2, 4, 6)  # (B, C, L), mask (B, 1, L)
    assert space.num_dims(audio, torch.tensor([[[1, 1, 1, 0, 0, 0]], [[1] * 6]])).tolist() == [12.0, 24.0]


def test_a_mask_that_does_not_fit_is_a_user_error():
    with pytest.raises(UserError, match="mask of shape"):
        Space().num_dims(torch.zeros(2, 4, 6), torch.ones(2, 6))


def test_default_space_and_guidance_share_it():
    den = Denoiser(lambda x, t: x, SCHED)
    assert type(den.space) is Space
    custom = Denoiser(lambda x, t, **c: x, SCHED, space=ZeroMean())
    assert CFGDenoiser(custom, {"y": torch.zeros(1)}, {"y": torch.ones(1)}, 2.0).space is custom.space


def test_per_sample_times_equal_row_wise_calls():
    gmm = GaussianMixture(torch.tensor([[1.0, -1.0], [-2.0, 0.5]]), torch.tensor([0.5, 0.3]))
    for parameterization in ("eps", "v"):
        model = gmm.eps_model(SCHED)
        fn = model if parameterization == "eps" else _as_v(model)
        den = Denoiser(fn, SCHED, parameterization)
        x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        t = torch.tensor([0.0, 10.5, 400.0, 999.0], dtype=torch.float64)
        out = den(x, t)
        for i in range(4):
            row = den(x[i:i + 1], t[i])
            # float64, one row alone vs the batch: seen 0; tightened from 1e-12 to 1e-13 (~450 eps, covers BLAS blocking changes).
            torch.testing.assert_close(out.x0[i:i + 1], row.x0, rtol=1e-13, atol=1e-13)
            # float64 eps from the same row (|eps| up to ~1.5): seen 0; tightened from 1e-12 to 1e-13.
            torch.testing.assert_close(out.eps[i:i + 1], row.eps, rtol=1e-13, atol=1e-13)
    with pytest.raises(UserError, match="one per sample"):
        den(x, t[:2])


def _as_v(eps_model):
    """The same model in v-prediction: v = alpha eps - sigma x0, x0 = (x - sigma eps) / alpha."""

    def v_fn(x, t):
        t64 = t.to(torch.float64)
        a, s = SCHED.alpha(t64)[:, None], SCHED.sigma(t64)[:, None]
        eps = eps_model(x, t)
        return a * eps - s * (x - s * eps) / a

    return v_fn
