"""difflab.sample: NFE accounting, per-sample seeding, identities between samplers, and bad input."""

import pytest
import torch
from gmm_fixtures import mixture_2d, prior_noise  # noqa: F401

from difflab.denoiser import Denoiser
from difflab.errors import UserError
from difflab.noise import NoiseSource
from difflab.process import v_from_x0_eps, x0_from_eps
from difflab.samplers import SampleResult, expected_nfe, make_grid, sample, sampler_names
from difflab.schedules import NoiseSchedule, broadcast_to

pytestmark = pytest.mark.usefixtures("one_thread")
SCHEDULE = NoiseSchedule.linear(1000)
MIX = mixture_2d()
MODEL = MIX.eps_model(SCHEDULE)
OURS = ["ddpm", "ddim", "euler", "heun", "dpm_solver", "dpm_solver_1", "dpm_solver_2", "dpm_solver_3",
        "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde"]
STOCHASTIC = [("ddpm", {}), ("ddpm", {"variance": "large"}), ("ddim", {"eta": 0.5}), ("dpmpp_2m_sde", {})]


def documented_nfe(name: str, n: int) -> int:
    """The formulas of docs/samplers.md, written out independently of expected_nfe."""
    per_step = {"dpm_solver": 3, "dpm_solver_2": 2, "dpm_solver_3": 3}
    if name == "heun":
        return 2 * n - 1
    if name in per_step:
        return per_step[name] * (n - 1) + 1
    return n


def test_all_samplers_registered():
    assert set(OURS) <= set(sampler_names())


@pytest.mark.parametrize("name", OURS)
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_nfe_is_exact(name, steps):
    out = sample(MODEL, prior_noise(3, 2), name, steps, SCHEDULE, torch.Generator().manual_seed(0))
    assert isinstance(out, SampleResult) and out.samples.shape == (3, 2)
    assert out.nfe == documented_nfe(name, steps) == expected_nfe(name, steps)


@pytest.mark.parametrize("name", OURS)
def test_last_step_lands_on_the_clean_estimate(name):
    """An x0-model that always answers c: every sampler must return exactly c (no residual noise)."""
    c = torch.tensor([[0.3, -1.2]], dtype=torch.float64).expand(4, 2)
    out = sample(lambda x, t: c.clone(), prior_noise(4, 2), name, 6, SCHEDULE, torch.Generator().manual_seed(0),
                 parameterization="x0")
    # float64, |c| ~ 1: the last step returns x0 = c up to an affine round trip (seen 2.2e-16); 1e-12 = 4500x.
    torch.testing.assert_close(out.samples, c, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,options", STOCHASTIC)
def test_sample_i_depends_only_on_seed_i(name, options):
    seeds = [1, 2, 3, 4]
    x = NoiseSource.from_seeds(seeds).randn((2,), dtype=torch.float64)
    whole = sample(MODEL, x, name, 8, SCHEDULE, NoiseSource.from_seeds(seeds), **options).samples
    parts = [sample(MODEL, x[i:i + 2], name, 8, SCHEDULE, [torch.Generator().manual_seed(s) for s in seeds[i:i + 2]],
                    **options).samples for i in (0, 2)]
    # float64, row-wise arithmetic, 8 steps: seen exactly 0; 1e-12 only allows batched-kernel reordering ulps.
    torch.testing.assert_close(whole, torch.cat(parts), rtol=0, atol=1e-12)
    other = sample(MODEL, x, name, 8, SCHEDULE, NoiseSource.from_seeds([1, 2, 3, 5]), **options).samples
    # float64, as above (seen 0): the other rows' seeds cannot leak in.
    torch.testing.assert_close(other[:3], whole[:3], rtol=0, atol=1e-12)
    assert not torch.allclose(other[3], whole[3])


def test_generator_kinds_are_accepted():
    x = prior_noise(4, 2)
    shared = sample(MODEL, x, "ddpm", 5, SCHEDULE, torch.Generator().manual_seed(9)).samples
    again = sample(MODEL, x, "ddpm", 5, SCHEDULE, torch.Generator().manual_seed(9)).samples
    assert torch.equal(shared, again)
    assert sample(MODEL, x, "ddpm", 5, SCHEDULE, None).samples.shape == (4, 2)


def test_samplers_that_are_the_same_method_agree():
    x, grid = prior_noise(50, 2), make_grid(SCHEDULE, 12, "logsnr")
    runs = {name: sample(MODEL, x, name, schedule=SCHEDULE, timesteps=grid).samples for name in ("ddim", "euler", "dpm_solver_1")}
    # float64, 12 steps of algebraically equal updates written differently: seen 1.4e-15; 1e-12 = 700x.
    torch.testing.assert_close(runs["euler"], runs["ddim"], rtol=0, atol=1e-12)  # DDIM = Euler in (x~, s)
    # float64, same argument (seen 1.4e-15); 1e-12.
    torch.testing.assert_close(runs["dpm_solver_1"], runs["ddim"], rtol=0, atol=1e-12)  # Lu et al. 2022, sec. 4.1
    ddpm = sample(MODEL, x, "ddpm", schedule=SCHEDULE, timesteps=grid, generator=torch.Generator().manual_seed(1))
    ddim1 = sample(MODEL, x, "ddim", schedule=SCHEDULE, timesteps=grid, generator=torch.Generator().manual_seed(1), eta=1.0)
    # float64, 12 steps, same noise draws, posterior variance written two ways: seen 2.7e-15; 1e-12 = 370x.
    torch.testing.assert_close(ddpm.samples, ddim1.samples, rtol=0, atol=1e-12)  # eta = 1 is the DDPM posterior
    sde0 = sample(MODEL, x, "dpmpp_2m_sde", schedule=SCHEDULE, timesteps=grid, eta=0.0)
    # float64, eta = 0 removes the noise term exactly, leaving reordered float64 sums: seen 1.3e-15; 1e-12 = 750x.
    torch.testing.assert_close(sde0.samples, sample(MODEL, x, "dpmpp_2m", schedule=SCHEDULE, timesteps=grid).samples,
                               rtol=0, atol=1e-10)
    generic = sample(MODEL, x, "dpm_solver", schedule=SCHEDULE, timesteps=grid, order=2).samples
    torch.testing.assert_close(generic, sample(MODEL, x, "dpm_solver_2", schedule=SCHEDULE, timesteps=grid).samples)


@pytest.mark.parametrize("parameterization", ["x0", "v"])
def test_every_parameterization_gives_the_same_samples(parameterization):
    def model(x, t):
        eps = MODEL(x, t)
        alpha, sigma = broadcast_to(SCHEDULE.alpha(t.double()), x), broadcast_to(SCHEDULE.sigma(t.double()), x)
        x0 = x0_from_eps(x, eps, alpha, sigma)
        return x0 if parameterization == "x0" else v_from_x0_eps(x0, eps, alpha, sigma)

    x = prior_noise(20, 2)
    ref = sample(MODEL, x, "dpmpp_2m", 10, SCHEDULE).samples
    other = sample(model, x, "dpmpp_2m", 10, SCHEDULE, parameterization=parameterization).samples
    # float64 x0/v <-> eps conversions at the same (float32-rounded) t in both runs, 10 steps: seen 1.3e-15; 1e-12 = 750x.
    # (affine maps at fixed t, and both runs see the same t, so only float64 roundings differ)
    torch.testing.assert_close(other, ref, rtol=0, atol=1e-12)


def test_denoiser_cond_and_progress(capsys):
    seen = []

    def model(x, t, label=None):
        seen.append(label)
        return MODEL(x, t)

    den = Denoiser(model, SCHEDULE)
    out = sample(den, prior_noise(2, 2), "heun", 4, cond={"label": 3}, progress=True)
    assert out.nfe == 7 and den.nfe == 7 and seen == [3] * 7
    assert "7/7" in capsys.readouterr().err


# ----- bad input -------------------------------------------------------------------------------------
def test_unknown_sampler_lists_valid_names():
    with pytest.raises(UserError, match="unknown sampler 'dpm\\+\\+'.*dpmpp_2m.*heun"):
        sample(MODEL, prior_noise(2, 2), "dpm++", 5, SCHEDULE)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"grid": "fancy"}, "unknown grid 'fancy'"),
        ({"timesteps": [999.0, 200.0, 500.0, -1.0]}, "strictly decrease"),
        ({"timesteps": [999.0, 200.0, 0.0]}, "must end at the clean end"),
        ({"timesteps": [999.0, -1.0], "grid": "karras"}, "not both"),
        ({"cfg_scale": 2.0}, "unknown option\\(s\\) \\['cfg_scale'\\].*valid options: lower_order_final=True"),
        ({"sampler": "ddim", "eta": 1.5}, "eta must lie in \\[0, 1\\], got 1.5"),
        ({"sampler": "ddim", "eta": -0.1}, "eta must lie in \\[0, 1\\]"),
        ({"sampler": "dpmpp_2m_sde", "eta": 2.0}, "eta must lie in \\[0, 1\\]"),
        ({"sampler": "dpm_solver", "order": 4}, "order must be one of \\(1, 2, 3\\), got 4"),
        ({"sampler": "ddpm", "variance": "huge"}, "unknown variance 'huge'"),
        ({"sampler": "euler", "eta": 0.5}, "valid options: none"),
    ],
)
def test_bad_arguments_raise_user_errors(kwargs, message):
    kwargs = {"sampler": "dpmpp_2m", "steps": 5, **kwargs}
    with pytest.raises(UserError, match=message):
        sample(MODEL, prior_noise(2, 2), schedule=SCHEDULE, **kwargs)


def test_bad_models_raise_user_errors():
    x = prior_noise(2, 2)
    with pytest.raises(UserError, match="schedule="):
        sample(MODEL, x, "ddim", 5)
    with pytest.raises(UserError, match="returned \\(2, 3\\) for input of shape \\(2, 2\\)"):
        sample(lambda x, t: torch.zeros(2, 3), x, "ddim", 5, SCHEDULE)
    with pytest.raises(UserError, match="NaN or Inf"):
        sample(lambda x, t: torch.full_like(x, float("nan")), x, "dpmpp_2m", 5, SCHEDULE)
    with pytest.raises(UserError, match="noise must be a tensor"):
        sample(MODEL, [[0.0, 1.0]], "ddim", 5, SCHEDULE)


@pytest.mark.parametrize("spec, truth", [("linear", NoiseSchedule.linear(1000)), ("cosine", NoiseSchedule.cosine(1000)),
                                         ({"kind": "linear", "num_timesteps": 50}, NoiseSchedule.linear(50))])
def test_schedule_by_name_or_config(spec, truth):
    """A kind name is that kind with T = 1000, a dict is NoiseSchedule.from_config: same samples, bit for bit."""
    x = prior_noise(3, 2)
    got = sample(MODEL, x, "ddim", steps=5, schedule=spec)
    assert torch.equal(got.samples, sample(MODEL, x, "ddim", steps=5, schedule=truth).samples)


@pytest.mark.parametrize("spec, message", [(3, "got int 3.*kinds: cosine, linear, quadratic, scaled_linear"),
                                           ("warp", "unknown schedule kind 'warp'.*cosine"),
                                           ({"kind": "nope"}, "unknown schedule kind 'nope'")])
def test_bad_schedule_spec_is_a_user_error(spec, message):
    with pytest.raises(UserError, match=message):
        sample(MODEL, prior_noise(2, 2), "ddim", steps=5, schedule=spec)
