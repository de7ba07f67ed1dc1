"""Learned variance, L_hybrid / L_vlb and importance sampling of t (Nichol & Dhariwal 2021, "Improved DDPM")."""

import math

import pytest
import torch
import yaml
from conftest import tiny_config_dict

from difflab.denoiser import Denoiser
from difflab.errors import UserError
from difflab.likelihood import vlb_bits_per_dim, vlb_term
from difflab.losses import HYBRID_LAMBDA, diffusion_loss, vlb_loss_term
from difflab.noise import NoiseSource
from difflab.process import (
    discrete_posterior,
    learned_log_variance,
    p_reverse,
    split_variance_output,
)
from difflab.samplers import sample
from difflab.samplers.ddpm import ddpm
from difflab.schedules import NoiseSchedule
from difflab.training import TrainConfig
from difflab.training.timesteps import (
    HISTORY,
    ImportanceSampler,
    TimestepSampler,
    make_timestep_sampler,
)

pytestmark = pytest.mark.usefixtures("one_thread")
SCHED = NoiseSchedule.linear(1000)


def beta_tilde(schedule):
    """beta-tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) (Ho et al. 2020, eq. 7), alpha_bar_{-1} = 1."""
    ab = schedule.alphas_cumprod
    prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
    return schedule.betas * (1 - prev) / (1 - ab)


def learned_model(pred_fn, v_fn):
    """A 2C-channel 'network': the mean prediction, then v_raw."""
    return lambda x, t, **_: torch.cat([pred_fn(x, t), v_fn(x, t)], dim=1)


# ----- the variance formula ------------------------------------------------------------------
@pytest.mark.parametrize("schedule", [NoiseSchedule.linear(1000), NoiseSchedule.cosine(50)], ids=["linear", "cosine"])
def test_sigma_ends_are_beta_tilde_and_beta(schedule):
    """Eq. 15: v = 0 gives beta-tilde (clipped to its index-1 value at index 0), v = 1 gives beta, v = 1/2 their geometric mean."""
    t = torch.arange(schedule.T)
    ones = torch.ones(schedule.T, dtype=torch.float64)
    small, large = learned_log_variance(schedule, -ones, t).exp(), learned_log_variance(schedule, ones, t).exp()
    expected_small = beta_tilde(schedule)
    expected_small[0] = expected_small[1]
    # float64 exp(log) round trips of table values: seen 8e-16 relative; 1e-12 = 1200x.
    torch.testing.assert_close(small, expected_small, rtol=1e-12, atol=0)
    # float64, as above (seen 8.5e-16).
    torch.testing.assert_close(large, schedule.betas, rtol=1e-12, atol=0)
    mid = learned_log_variance(schedule, 0 * ones, t).exp()
    # float64 interpolation in log space then exp: seen 1.7e-15 relative; 1e-12 = 600x.
    torch.testing.assert_close(mid, (expected_small * schedule.betas).sqrt(), rtol=1e-12, atol=0)
    # beta-tilde is the posterior variance of q(x_{t-1} | x_t, x0) for t >= 1 (independent code path)
    x = torch.zeros(schedule.T - 1, 1, dtype=torch.float64)
    post = discrete_posterior(schedule, x, x, t[1:])
    # float64, beta-tilde via 1 - alpha-bar products (cancellation near t = 1 costs ~1e-13): seen 7.7e-13; 1e-10 = 130x.
    torch.testing.assert_close(small[1:], post.var.flatten(), rtol=1e-10, atol=0)


def test_split_variance_output():
    out = torch.arange(2 * 6 * 4, dtype=torch.float32).reshape(2, 6, 4)
    pred, v = split_variance_output(out, 3)
    assert torch.equal(pred, out[:, :3]) and torch.equal(v, out[:, 3:])
    with pytest.raises(UserError, match="out_channels=6"):
        split_variance_output(out[:, :5], 3)


# ----- the losses ----------------------------------------------------------------------------
def _leaf_net(x0, learn_variance, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(x0.shape, generator=g, dtype=x0.dtype).requires_grad_(True)
    V = (0.5 * torch.randn(x0.shape, generator=g, dtype=x0.dtype)).requires_grad_(True)
    net = (lambda x, t, **_: torch.cat([P, V], 1)) if learn_variance else (lambda x, t, **_: P * 1)
    return net, P, V


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_hybrid_mean_gradient_is_the_simple_gradient(parameterization):
    """Sec. 3.1: L_hybrid = L_simple + lambda L_vlb with a stop-gradient on the mean inside L_vlb."""
    torch.manual_seed(0)
    x0, noise = torch.rand(4, 3, 4, 4) * 2 - 1, torch.randn(4, 3, 4, 4)
    t = torch.tensor([0, 3, 400, 999])
    common = {"parameterization": parameterization}
    net, P, V = _leaf_net(x0, True)
    diffusion_loss(net, x0, SCHED, t, noise, loss="hybrid", learn_variance=True, **common).sum().backward()
    net_s, P_s, _ = _leaf_net(x0, False)
    diffusion_loss(net_s, x0, SCHED, t, noise, **common).sum().backward()
    # exact: the stop-gradient makes the mean's gradient the same float32 ops in both losses (seen 0).
    torch.testing.assert_close(P.grad, P_s.grad, rtol=0, atol=0)
    assert V.grad is not None and V.grad.abs().sum() > 0
    net_v, P_v, V_v = _leaf_net(x0, True)  # vlb alone: gradients through both
    diffusion_loss(net_v, x0, SCHED, t, noise, loss="vlb", learn_variance=True, **common).sum().backward()
    assert P_v.grad.abs().sum() > 0 and V_v.grad.abs().sum() > 0


def test_hybrid_is_simple_plus_lambda_T_vlb():
    torch.manual_seed(1)
    x0, noise, t = torch.rand(3, 2, 4, 4) * 2 - 1, torch.randn(3, 2, 4, 4), torch.tensor([0, 10, 500])
    net, _, _ = _leaf_net(x0, True)
    parts = {}
    hybrid = diffusion_loss(net, x0, SCHED, t, noise, loss="hybrid", learn_variance=True, parts=parts)
    vlb = diffusion_loss(net, x0, SCHED, t, noise, loss="vlb", learn_variance=True)
    torch.testing.assert_close(hybrid, parts["simple"] + HYBRID_LAMBDA * SCHED.T * parts["vlb"])
    torch.testing.assert_close(vlb, SCHED.T * parts["vlb"])


def test_vlb_of_the_true_posterior_is_zero():
    """KL of identical Gaussians: predicted x0 = true x0 and v_raw = -1 (beta-tilde) give L_t = 0 for t >= 1."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor([1, 2, 100, 500, 999])
    x_t = SCHED.alpha(t.double()).view(-1, 1, 1, 1) * x0 + SCHED.sigma(t.double()).view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    terms = vlb_loss_term(SCHED, x0, x_t, t, x0, -torch.ones_like(x0), "x0")
    # float64: KL of identical Gaussians is a sum of O(1) terms cancelling to ~1e-16 (bits); 1e-12 bounds it with margin.
    assert terms.abs().max().item() < 1e-12
    # moving the predicted x0 by d moves the mean by sqrt(ab_{t-1}) beta_t / (1 - ab_t) d (Ho et al. 2020, eq. 7):
    # KL = (that shift)^2 / (2 beta-tilde_t) per dimension
    moved = vlb_loss_term(SCHED, x0, x_t, t, x0 + 0.01, -torch.ones_like(x0), "x0")
    ab, ab_prev = SCHED.alphas_cumprod[t], SCHED.alphas_cumprod[t - 1]
    shift = ab_prev.sqrt() * SCHED.betas[t] / (1 - ab) * 0.01
    # float64: the general KL formula cancels O(1) log/variance terms, so its error is absolute (~1e-16 bits;
    # seen 2.5e-17 at t = 999 where KL = 6e-11, 1.5e-16 at t = 500): rtol 1e-10 + atol 1e-15 is 6x that.
    torch.testing.assert_close(moved, shift**2 / (2 * beta_tilde(SCHED)[t]) / math.log(2), rtol=1e-10, atol=1e-15)


def test_vlb_terms_match_torch_distributions():
    """L_t (t >= 1) against torch.distributions' KL, L_0 against the Gaussian CDF over each 8-bit bin."""
    g = torch.Generator().manual_seed(3)
    k = torch.randint(0, 256, (4, 2, 3, 3), generator=g)
    k[0, 0, 0, 0], k[0, 0, 0, 1] = 0, 255  # both outer bins
    x0 = k.double() / 127.5 - 1
    x_t, v_raw = torch.randn(x0.shape, generator=g, dtype=torch.float64), torch.rand(x0.shape, generator=g, dtype=torch.float64) * 2 - 1
    x0_pred = x0 + 0.02 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 37, 999])
    model = p_reverse(SCHED, x_t, x0_pred, t, "learned", v_raw)
    got = vlb_term(SCHED, x0, x_t, t, model)
    post = discrete_posterior(SCHED, x0, x_t, t)
    N = torch.distributions.Normal
    kl = torch.distributions.kl_divergence(N(post.mean[1:], post.var[1:].expand_as(x0[1:]).sqrt()), N(model.mean[1:], model.var[1:].sqrt()))
    # float64 closed-form KL vs torch.distributions: seen 4.4e-16 abs (1.8e-5 relative on near-zero KLs, hence the atol).
    torch.testing.assert_close(got[1:], kl, rtol=1e-10, atol=1e-12)
    d = N(model.mean[0], model.var[0].sqrt())
    hi = torch.where(k[0] == 255, torch.ones_like(x0[0]), d.cdf(x0[0] + 1 / 255))
    lo = torch.where(k[0] == 0, torch.zeros_like(x0[0]), d.cdf(x0[0] - 1 / 255))
    # float64 log of a CDF difference over a bin of width 2/255 (cancellation ~1e-13 relative):
    # seen 1.7e-12 abs on O(10) values, 6700x below the bound.
    torch.testing.assert_close(got[0], -torch.log(hi - lo), rtol=1e-9, atol=1e-12)
    in_bits = vlb_loss_term(SCHED, x0, x_t, t, x0_pred, v_raw, "x0")
    torch.testing.assert_close(in_bits, got.flatten(1).mean(1) / math.log(2))


def test_vlb_bits_per_dim_with_learned_ends_equals_fixed_variances():
    """v_raw = +1 is beta (the "large" bound, decoder beta_0); v_raw = -1 is beta-tilde ("small", decoder clipped)."""
    sched = NoiseSchedule.linear(50, 2e-3, 0.4)
    x0 = (torch.randint(0, 256, (3, 2), generator=torch.Generator().manual_seed(4)).double() / 127.5 - 1)
    eps_fn = lambda x, t: 0.3 * x + 0.01 * t.reshape(-1, 1) / 50
    for v, fixed in [(1.0, "large"), (-1.0, "small")]:
        learned = Denoiser(learned_model(eps_fn, lambda x, t, v=v: torch.full_like(x, v)), sched, learn_variance=True)
        ours = vlb_bits_per_dim(learned, x0, generator=torch.Generator().manual_seed(5))
        ref = vlb_bits_per_dim(Denoiser(eps_fn, sched), x0, variance=fixed, generator=torch.Generator().manual_seed(5))
        # float64, the same Gaussian terms reached through two code paths: seen 5.8e-16 relative; 1e-12 = 1700x.
        torch.testing.assert_close(ours.nats, ref.nats, rtol=1e-12, atol=0)


# ----- sampling ------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", ["leading", "uniform"])
def test_ddpm_with_learned_ends_is_the_fixed_sampler(grid):
    """Sec. 4 rule on strided grids: v_raw = -1 is the step's posterior variance, +1 its beta_{t|s}."""
    eps_fn = lambda x, t: torch.sin(x) * 0.5
    x = torch.randn(6, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    for v, fixed in [(1.0, "large"), (-1.0, "small")]:
        learned = Denoiser(learned_model(eps_fn, lambda x, t, v=v: torch.full_like(x, v)), SCHED, learn_variance=True)
        ours = sample(learned, x, "ddpm", 20, generator=torch.Generator().manual_seed(7), grid=grid)
        ref = sample(eps_fn, x, "ddpm", 20, SCHED, torch.Generator().manual_seed(7), grid=grid, variance=fixed)
        # float64, 20 ancestral steps with the same draws, variance via exp(log): seen 3.4e-13 abs; 1e-10 = 300x.
        torch.testing.assert_close(ours.samples, ref.samples, rtol=0, atol=1e-10)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("steps,t", [(1000, 999), (1000, 500), (1000, 1), (50, 980), (50, 500), (50, 20)])
def test_learned_range_step_matches_diffusers(steps, t):
    """One ancestral step against diffusers' DDPMScheduler(variance_type="learned_range"), same model output and noise."""
    from diffusers import DDPMScheduler

    peer = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         variance_type="learned_range", clip_sample=False, timestep_spacing="leading")
    peer.betas, peer.alphas, peer.alphas_cumprod = SCHED.betas.clone(), SCHED.alphas.clone(), SCHED.alphas_cumprod.clone()
    peer.set_timesteps(steps)
    prev = int(peer.previous_timestep(t))
    model = learned_model(lambda x, t: 0.4 * x + 0.1 * torch.cos(x), lambda x, t: torch.tanh(2 * x + t.reshape(-1, 1, 1, 1) / 1000))
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    theirs = peer.step(model(x, torch.full((4,), float(t), dtype=torch.float64)), t, x,
                       generator=torch.Generator().manual_seed(9)).prev_sample
    noise = NoiseSource.from_any(torch.Generator().manual_seed(9), 4)
    ours = ddpm(Denoiser(model, SCHED, learn_variance=True), x, torch.tensor([float(t), float(prev)]), noise)
    # float64 tables on both sides, one step: seen 7.3e-13 (diffusers' op order); 1e-10 = 140x.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


# ----- importance sampling of t --------------------------------------------------------------
def _warm(T, seed=0):
    sampler = ImportanceSampler(T)
    g = torch.Generator().manual_seed(seed)
    for _ in range(HISTORY + 2):  # 12 rounds: only the last 10 may count
        t = torch.randperm(T, generator=g)
        sampler.update(t, (t + 1).double() * (1 + 0.3 * torch.rand(T, generator=g, dtype=torch.float64)))
    return sampler


def test_importance_sampler_is_uniform_until_warm_then_sqrt_mean_square():
    T = 20
    sampler = ImportanceSampler(T)
    ref = torch.randint(0, T, (7,), generator=torch.Generator().manual_seed(1))
    t, w = sampler.sample(7, torch.Generator().manual_seed(1))
    assert torch.equal(t, ref) and torch.equal(w, torch.ones(7))  # same draws as uniform sampling
    values = {i: [] for i in range(T)}
    g = torch.Generator().manual_seed(2)
    for round_ in range(HISTORY + 3):
        ts = torch.arange(T) if round_ < HISTORY + 2 else torch.arange(T - 1)  # t = T-1 stays at 12 values
        losses = torch.rand(len(ts), generator=g, dtype=torch.float64) * (ts + 1)
        sampler.update(ts, losses)
        for i, v in zip(ts.tolist(), losses.tolist()):
            values[i].append(v)
        assert sampler.warm == (round_ >= HISTORY - 1)
    rms = torch.tensor([math.sqrt(sum(v * v for v in values[i][-HISTORY:]) / HISTORY) for i in range(T)], dtype=torch.float64)
    # float64 sums of 10 squares and a normalisation: seen 2.2e-16 relative; 1e-12.
    torch.testing.assert_close(sampler.probabilities(), rms / rms.sum(), rtol=1e-12, atol=0)


def test_importance_weights_are_unbiased():
    """E_{t~p}[f(t) / (T p_t)] = (1/T) sum_t f(t): 20000 draws land within 4 standard errors."""
    T = 30
    sampler = _warm(T)
    p = sampler.probabilities()
    f = torch.cos(torch.arange(T, dtype=torch.float64)) + 1.5
    target = f.mean().item()
    t, w = sampler.sample(20000, torch.Generator().manual_seed(3))
    est = f[t] * w.double()
    # a Monte-Carlo mean of 20000 draws: 4 standard errors (two-sided false-failure rate 6e-5).
    assert abs(est.mean().item() - target) < 4 * est.std().item() / math.sqrt(len(est))
    assert not torch.allclose(w, torch.ones_like(w))  # actually importance-weighted
    # float32 weights from float64 probabilities: one rounding (6e-8 relative; seen 5.8e-8); 1e-6 = 16 ulps.
    torch.testing.assert_close(w.double(), 1 / (T * p[t]), rtol=1e-6, atol=0)


def test_importance_state_round_trip():
    a = _warm(25, seed=4)
    b = make_timestep_sampler("importance", NoiseSchedule.linear(25))
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    for sampler in (a, b):
        sampler.update(torch.tensor([3, 3, 7]), torch.tensor([1.0, 2.0, 3.0]))
    draws = [s.sample(50, torch.Generator().manual_seed(5)) for s in (a, b)]
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    assert torch.equal(a.probabilities(), b.probabilities())
    with pytest.raises(UserError, match="another schedule"):
        make_timestep_sampler("importance", NoiseSchedule.linear(10)).load_state_dict(a.state_dict())
    assert type(make_timestep_sampler("uniform", NoiseSchedule.linear(5))) is TimestepSampler and TimestepSampler(5).state_dict() == {}


# ----- configuration and training ------------------------------------------------------------
@pytest.mark.parametrize("objective,match", [
    ({"loss": "hybrid"}, "needs a learned variance"),
    ({"learn_variance": True}, "cannot train a learned variance"),
    ({"timestep_sampling": "importance"}, "loss vlb or hybrid"),
    ({"loss": "kl"}, "objective.loss"),
    ({"loss": "vlb", "weighting": "min_snr"}, "weighting: uniform"),
    ({"timestep_sampling": "sqrt"}, "objective.timestep_sampling"),
])
def test_bad_objectives(objective, match):
    with pytest.raises(UserError, match=match):
        TrainConfig.from_dict({"objective": objective})
    TrainConfig.from_dict({"objective": {"loss": "vlb", "timestep_sampling": "importance"}})  # fixed variance: fine


def test_trainer_uses_importance_weights(tmp_path):
    from difflab.recipes.diffusion import build_diffusion_training

    cfg = TrainConfig.from_dict({**tiny_config_dict(), "objective": {"parameterization": "eps", "learn_variance": True, "loss": "vlb", "timestep_sampling": "importance"}})
    trainer = build_diffusion_training(cfg, tmp_path, progress=False)
    assert trainer.model.config.out_channels == 6
    trainer.train_step(0)
    assert int(trainer.objective.timestep_sampler.count.sum()) == cfg.optim.batch_size and not trainer.objective.timestep_sampler.warm
    T = trainer.objective.schedule.T
    trainer.objective.timestep_sampler.load_state_dict(_warm(T).state_dict())
    batch = trainer._local_batch(1)
    t, w = batch["t"], batch["weights"]
    # float32 weights from float64 probabilities: one rounding each (6e-8 relative); 1e-6 = 16 ulps of margin.
    torch.testing.assert_close(w.double(), 1 / (T * trainer.objective.timestep_sampler.probabilities()[t]), rtol=1e-6, atol=0)
    assert not torch.allclose(w, torch.ones_like(w))  # the weights are not uniform, so weighting is visible below
    # The step's loss by hand on the same batch and (pre-step) weights: mean_i w_i L_vlb(x0_i, t_i, eps_i),
    # L_vlb being the per-sample KL / decoder NLL term checked against the Gaussian formulas above.
    with torch.no_grad():
        trainer.model.train()
        per_sample = diffusion_loss(trainer.model, batch["x"], trainer.objective.schedule, batch["t"].cpu(), batch["noise"],
                                    loss="vlb", learn_variance=True)
    expected = (per_sample * w.to(per_sample.dtype)).mean().item()
    unweighted = per_sample.mean().item()
    # float32, the trainer's own ops (seen bit-equal): 1e-6 leaves only a few ulps of a 4-term batch mean for a
    # different reduction order, while the unweighted mean is off by 42% (weighting forgotten would fail).
    assert abs(expected - unweighted) > 1e-3 * abs(expected)
    assert trainer.train_step(1) == pytest.approx(expected, rel=1e-6)


def test_train_save_load_and_sample_with_learned_variance(tmp_path, capsys):
    """CLI flags -> a 2C-channel UNet trained with L_hybrid and importance sampling -> pipeline -> ddpm and ddim."""
    from difflab.cli import main
    from difflab.pipelines.diffusion import DiffusionPipeline

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config_dict(steps=4)))
    main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress", "--learn-variance",
          "--loss", "hybrid", "--timestep-sampling", "importance"])
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "run")
    assert pipe.learn_variance and pipe.unet.config.out_channels == 6
    for name in ("ddpm", "ddim"):
        out = pipe(num_images=2, num_inference_steps=3, sampler=name, seed=0, progress=False)
        assert out.samples.shape == (2, 3, 16, 16) and torch.isfinite(out.samples).all() and out.nfe == 3
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(cfg), "--out", str(tmp_path / "bad"), "--loss", "hybrid", "--no-progress"])
    assert exit_info.value.code == 2 and "needs a learned variance" in capsys.readouterr().err
