"""Peer parity: the same model outputs into difflab and into diffusers' schedulers give the same samples.

The model is the exact eps of a 2-D Gaussian mixture. In float32 diffusers uses its own float32
tables (agreement to 1e-5); in float64 its tables are replaced by ours (same betas, float64), which
isolates the algorithm: agreement to 1e-10. For eta > 0 both draw the same noise.
"""

import pytest
import torch
from gmm_fixtures import mixture_2d, prior_noise  # noqa: F401

from difflab.samplers import sample
from difflab.schedules import NoiseSchedule

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
SCHEDULE = NoiseSchedule.linear(1000)
PEER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
BATCH = 16


def float64_tables(peer):
    """Give a diffusers scheduler our float64 tables (its own are float32)."""
    peer.betas, peer.alphas, peer.alphas_cumprod = SCHEDULE.betas.clone(), SCHEDULE.alphas.clone(), SCHEDULE.alphas_cumprod.clone()
    return peer


def run_peer(peer, model, x, steps, seed=None, step_kwargs=None):
    """diffusers' loop; noise for every step but the last drawn like difflab's shared generator."""
    peer.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for i, t in enumerate(peer.timesteps):
        kwargs = dict(step_kwargs or {})
        if gen is not None:
            last = i == len(peer.timesteps) - 1
            kwargs["variance_noise"] = torch.zeros_like(x) if last else torch.randn(x.shape, generator=gen, dtype=x.dtype)
        x = peer.step(model(x, t.to(x.dtype).expand(len(x))), t, x, **kwargs).prev_sample
    return x


@pytest.fixture
def model_and_noise():
    return mixture_2d().eps_model(SCHEDULE), prior_noise(BATCH, 2, seed=3)


# float32: 10 steps against diffusers' float32 tables, |x| ~ 3 (ulp 2.4e-7): seen 2.8e-6, 3.5x margin; float64: seen 1.3e-14.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers(model_and_noise, dtype, tol, spacing, eta):
    from diffusers import DDIMScheduler

    model, x = model_and_noise
    x = x.to(dtype)
    peer = DDIMScheduler(**PEER_CONFIG, clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing=spacing)
    if dtype == torch.float64:
        float64_tables(peer)
    seed = 7 if eta > 0 else None
    theirs = run_peer(peer, model, x.clone(), 10, seed, {"eta": eta})
    ours = sample(model, x.clone(), "ddim", 10, SCHEDULE, torch.Generator().manual_seed(7), grid=spacing, eta=eta)
    torch.testing.assert_close(ours.samples, theirs, rtol=0, atol=tol)


@pytest.mark.parametrize("variance,peer_type", [("small", "fixed_small"), ("large", "fixed_large")])
def test_ddpm_matches_diffusers(model_and_noise, variance, peer_type):
    from diffusers import DDPMScheduler

    model, x = model_and_noise
    peer = float64_tables(DDPMScheduler(**PEER_CONFIG, clip_sample=False, variance_type=peer_type, timestep_spacing="leading"))
    peer.set_timesteps(50)
    gen, theirs = torch.Generator().manual_seed(7), x.clone()
    for t in peer.timesteps:  # DDPMScheduler draws its noise from the generator, as our shared generator does
        theirs = peer.step(model(theirs, t.double().expand(BATCH)), t, theirs, generator=gen).prev_sample
    ours = sample(model, x.clone(), "ddpm", 50, SCHEDULE, torch.Generator().manual_seed(7), grid="leading", variance=variance)
    # float64 tables on both sides, 50 ancestral steps with the same draws: seen 1.3e-14; 1e-10 leaves room for diffusers' own op order.
    torch.testing.assert_close(ours.samples, theirs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("steps", [8, 20])  # below and above diffusers' lower_order_final threshold (15)
def test_dpmpp_2m_matches_diffusers(model_and_noise, steps):
    from diffusers import DPMSolverMultistepScheduler

    model, x = model_and_noise
    x = x.float()
    peer = DPMSolverMultistepScheduler(
        **PEER_CONFIG, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero",
        lower_order_final=True, timestep_spacing="trailing",
    )
    theirs = run_peer(peer, model, x.clone(), steps)
    ours = sample(model, x.clone(), "dpmpp_2m", steps, SCHEDULE, grid="trailing")
    # float32 peer (diffusers computes its tables in float32), <= 20 steps, |x| ~ 3: seen 4.8e-7; 1e-5 = 20x.
    torch.testing.assert_close(ours.samples, theirs, rtol=0, atol=1e-5)


def test_dpmpp_2m_sde_matches_diffusers(model_and_noise):
    from diffusers import DPMSolverMultistepScheduler

    model, x = model_and_noise
    x = x.float()
    peer = DPMSolverMultistepScheduler(
        **PEER_CONFIG, algorithm_type="sde-dpmsolver++", solver_order=2, final_sigmas_type="zero",
        lower_order_final=True, timestep_spacing="trailing",
    )
    theirs = run_peer(peer, model, x.clone(), 10, seed=7)
    ours = sample(model, x.clone(), "dpmpp_2m_sde", 10, SCHEDULE, torch.Generator().manual_seed(7), grid="trailing")
    # float32 peer (diffusers tables in float32), 10 SDE steps with shared noise: seen 6e-7; 1e-5 = 17x, a few ulps per step.
    torch.testing.assert_close(ours.samples, theirs, rtol=0, atol=1e-5)
