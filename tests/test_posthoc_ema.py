"""Post-hoc EMA (Karras et al. 2024, EDM2 sec. 3, app. C): checked against the integral definition, the
paper's numbers, numerical quadrature and power EMAs computed directly on a known trajectory."""

import math

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, run_cli
from safetensors.torch import load_file
from scipy.integrate import quad
from torch import nn

from difflab.errors import UserError
from difflab.training import checkpoint as ckpt
from difflab.training.config import TrainConfig
from difflab.training.posthoc_ema import (
    SIGMA_REL_MAX,
    SNAPSHOT_DIR,
    PowerEMA,
    checkpoint_entries,
    gamma_to_sigma_rel,
    list_snapshots,
    load_checkpoint_entries,
    profile_inner_products,
    reconstruct,
    save_snapshot,
    sigma_rel_to_gamma,
    solve_coefficients,
)

TRAINED = (0.05, 0.10)
STEPS, EVERY, DIM = 400, 10, 8


class Vector(nn.Module):
    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))


def set_theta(model: Vector, value) -> Vector:
    with torch.no_grad():
        model.theta.copy_(torch.as_tensor(value, dtype=torch.float64))
    return model


def trajectory(steps: int = STEPS, dim: int = DIM) -> torch.Tensor:
    """theta_1..theta_T: a seeded random walk with drift, row i-1 is theta_i."""
    g = torch.Generator().manual_seed(0)
    return torch.cumsum(0.1 * torch.randn(steps, dim, generator=g, dtype=torch.float64) + 0.02, 0)


def power_ema(thetas: torch.Tensor, sigma_rel: float, upto: int) -> torch.Tensor:
    model, tracker = Vector(thetas.shape[1]), None
    tracker = PowerEMA(model, sigma_rel)
    for i in range(1, upto + 1):
        tracker.update(set_theta(model, thetas[i - 1]), i)
    return tracker.averaged["theta"].clone()


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory):
    """Snapshots of the two trained lengths every EVERY steps of the known trajectory."""
    run = tmp_path_factory.mktemp("phema")
    thetas, model = trajectory(), Vector(DIM)
    trackers = [PowerEMA(model, s) for s in TRAINED]
    for i in range(1, STEPS + 1):
        set_theta(model, thetas[i - 1]).seen.fill_(i)
        for t in trackers:
            t.update(model, i)
            if i % EVERY == 0:
                save_snapshot(run, t)
    return run, thetas


# ----- sigma_rel <-> gamma ----------------------------------------------------------------------
def test_paper_values_and_round_trip():
    # published values have 2 decimals, so 5e-3 is their rounding half-width (seen 2.8e-3 and 2.2e-3: bounded by the rounding, not by float64 roundoff).
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)  # EDM2 sec. 3.1
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    # inputs 6.94/16.97 carry that 5e-3 rounding; d(sigma_rel)/d(gamma) ~ 6e-3 maps it to ~3e-5 (seen 2.8e-5, 5.5e-6); 1e-4 = 3.6x.
    assert gamma_to_sigma_rel(6.94) == pytest.approx(0.10, abs=1e-4)
    assert gamma_to_sigma_rel(16.97) == pytest.approx(0.05, abs=1e-4)
    for s in np.geomspace(1e-3, 0.299, 25):
        # float64 round trip (a few sqrt/div, ~10 roundings): seen 7.9e-16 rel; tightened from 1e-10 to 2e-14 (25x).
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=2e-14)
    for g in (-0.3, 0.0, 1.0, 6.94, 100.0, 1e4):
        # float64 round trip: seen 9e-16 rel (6.7e-16 abs at g=0); tightened from 1e-8 to 1e-14 (>10x).
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(g)) == pytest.approx(g, rel=1e-14, abs=1e-14)


@pytest.mark.parametrize("gamma", [0.0, 1.5, 6.94, 16.97])
def test_sigma_rel_is_the_relative_std_of_the_profile(gamma):
    p = lambda tau: (gamma + 1) * tau**gamma
    mass, mean, second = (quad(lambda x, k=k: x**k * p(x), 0, 1, epsabs=1e-13)[0] for k in (0, 1, 2))
    # bounded by quad's accuracy (epsabs 1e-13, default epsrel ~1.5e-8 reached much better): seen 6.9e-12; 1e-10 = 14x.
    assert mass == pytest.approx(1, rel=1e-10)
    # float64 moments from quad then sqrt(second - mean^2) (cancellation ~10x): seen 4.8e-11 rel; 1e-8 = 200x.
    assert gamma_to_sigma_rel(gamma) == pytest.approx(math.sqrt(second - mean**2), rel=1e-8)


@pytest.mark.parametrize("bad", [0.0, -0.1, SIGMA_REL_MAX, 0.31])
def test_sigma_rel_out_of_range(bad):
    with pytest.raises(UserError, match="out of range"):
        sigma_rel_to_gamma(bad)


# ----- the per-step update against the integral ------------------------------------------------
@pytest.mark.parametrize("sigma_rel", TRAINED)
def test_update_equals_integral_for_theta_equal_t(sigma_rel):
    """theta(tau) = tau: (gamma+1)/t^(gamma+1) int_0^t tau^gamma tau dtau = (gamma+1)/(gamma+2) t exactly, when
    theta_i is the tau^gamma-weighted mean of theta over the cell (i-1, i] (the time convention)."""
    g, model = sigma_rel_to_gamma(sigma_rel), Vector()
    tracker = PowerEMA(model, sigma_rel)
    for i in range(1, 201):
        cell = (g + 1) / (g + 2) * (i ** (g + 2) - (i - 1) ** (g + 2)) / (i ** (g + 1) - (i - 1) ** (g + 1))
        tracker.update(set_theta(model, [cell]), i)
        # float64 running average, one update per step over 200 steps (~200 roundings of O(eps)): seen 4.9e-15 rel; tightened from 1e-11 to 1e-13 (20x).
        assert tracker.averaged["theta"].item() == pytest.approx((g + 1) / (g + 2) * i, rel=1e-13)
    # with theta_i = i (theta(tau) = ceil(tau)), the continuous result for theta(tau) = tau is off by less than one step
    tracker = PowerEMA(model, sigma_rel)
    for i in range(1, 201):
        tracker.update(set_theta(model, [float(i)]), i)
        assert 0 <= tracker.averaged["theta"].item() - (g + 1) / (g + 2) * i < 1


def test_update_equals_integral_by_quadrature():
    """A random piecewise-constant theta: the EMA equals (gamma+1)/t^(gamma+1) int_0^t tau^gamma theta(tau) dtau."""
    sigma_rel, t = 0.1, 60
    g, thetas = sigma_rel_to_gamma(sigma_rel), trajectory(t, 1)[:, 0].tolist()
    integral = sum(quad(lambda x: x**g, i - 1, i, epsabs=0, epsrel=1e-13)[0] * thetas[i - 1] for i in range(1, t + 1))
    expected = (g + 1) / t ** (g + 1) * integral
    # reference is quad with epsrel 1e-13 summed over t cells: seen 1.8e-16; tightened from 1e-10 to 1e-13, the reference's requested accuracy (550x seen; tighter than that reference can't be trusted).
    assert power_ema(trajectory(t, 1), sigma_rel, t).item() == pytest.approx(expected, rel=1e-13)


def test_sparse_updates_hold_the_new_weights_since_the_last_update():
    """update(model, t) after update(model, s) treats theta as equal to the new weights over (s, t]."""
    thetas, model = trajectory(30, 3), Vector(3)
    every, sparse = PowerEMA(model, 0.07), PowerEMA(model, 0.07)
    updates = [1, 2, 3, 5, 10, 11, 20, 30]
    for i in range(1, 31):
        upcoming = min(u for u in updates if u >= i)
        every.update(set_theta(model, thetas[upcoming - 1]), i)
        if i in updates:
            sparse.update(model, i)
    # float64, sparse vs every-step updates run the same recurrence: seen 0 (bitwise); 1e-13 ~ 500 ulps for reordered sums.
    assert torch.allclose(sparse.averaged["theta"], every.averaged["theta"], rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="not after"):
        sparse.update(model, 30)


def test_state_dict_round_trip_through_a_checkpoint(tmp_path):
    thetas, model = trajectory(40, 4), Vector(4)
    first = [PowerEMA(model, s) for s in TRAINED]
    for i in range(1, 21):
        for t in first:
            t.update(set_theta(model, thetas[i - 1]), i)
    tensors, meta = checkpoint_entries(first)
    path = ckpt.save_checkpoint(tmp_path, tensors, {"step": 20, "posthoc_ema": meta})
    loaded, state = ckpt.load_checkpoint(path)
    resumed = [PowerEMA(set_theta(Vector(4), [9.0] * 4), s) for s in TRAINED]
    load_checkpoint_entries(resumed, loaded, state["posthoc_ema"])
    for i in range(21, 41):
        for a, b in zip(first, resumed):
            a.update(set_theta(model, thetas[i - 1]), i)
            b.update(model, i)
    for a, b in zip(first, resumed):
        assert a.step == b.step == 40
        assert torch.equal(a.averaged["theta"], b.averaged["theta"])
    with pytest.raises(UserError, match="sigma_rels"):
        load_checkpoint_entries([PowerEMA(model, 0.2)], loaded, state["posthoc_ema"])


# ----- reconstruction --------------------------------------------------------------------------
def test_closed_form_inner_products_and_fit_error_match_quadrature():
    gammas = [sigma_rel_to_gamma(s) for s in TRAINED for _ in range(3)]
    steps, (gamma, step) = [40, 70, 100] * 2, (sigma_rel_to_gamma(0.08), 100)
    profile = lambda g, t: lambda x: (g + 1) * x**g / t ** (g + 1) * (x <= t)
    numeric = quad(lambda x: profile(gammas[0], 40)(x) * profile(gammas[5], 100)(x), 0, 40, epsrel=1e-12)[0]
    # reference is quad at epsrel 1e-12: seen 1.8e-14 rel; tightened from 1e-9 to 1e-12 (56x seen, = the reference's accuracy).
    assert profile_inner_products([gammas[0]], [40], [gammas[5]], [100])[0, 0] == pytest.approx(numeric, rel=1e-12)
    coeffs, relative, absolute = solve_coefficients(gammas, steps, gamma, step)
    fit = lambda x: sum(c * profile(g, t)(x) for c, g, t in zip(coeffs, gammas, steps)) - profile(gamma, step)(x)
    err2 = quad(lambda x: fit(x) ** 2, 0, step, points=[40, 70], epsrel=1e-12, limit=200)[0]
    # reference is quad (epsrel 1e-12) of the squared fit residual, then sqrt: seen 6.1e-12 rel; tightened from 1e-5 to 1e-10 (16x).
    assert absolute == pytest.approx(math.sqrt(err2), rel=1e-10)
    assert relative == pytest.approx(absolute / math.sqrt(profile_inner_products([gamma], [step], [gamma], [step])[0, 0]))


@pytest.mark.parametrize("sigma_rel,step", [(0.07, STEPS), (0.15, STEPS), (0.035, STEPS), (0.07, 200)])
def test_reconstruction_matches_a_directly_computed_power_ema(snapshot_run, sigma_rel, step):
    """Bound: |sum_i c_i theta_hat_i - theta_hat*| = |int (sum c_i p_i - p*) theta| <= ||fit - p*||_2 ||theta||_2 on [0, step]
    (Cauchy-Schwarz, exact under the piecewise-constant convention), plus float64 rounding of the sum."""
    run, thetas = snapshot_run
    state, report = reconstruct(run / SNAPSHOT_DIR, sigma_rel, step)
    direct = power_ema(thetas, sigma_rel, step)
    assert report.step == step and all(s["step"] <= step for s in report.snapshots)
    assert report.fit_error < 0.01  # 40 snapshots per length over 400 steps cover 0.035-0.15 closely
    norm = thetas[:step].pow(2).sum(0).sqrt()
    rounding = 1e-12 * sum(abs(s["coefficient"]) for s in report.snapshots) * thetas[:step].abs().max()
    error = (state["theta"] - direct).abs()
    assert torch.all(error <= report.profile_error * norm + rounding), (error, report.profile_error * norm)
    nearest = min(TRAINED, key=lambda s: abs(s - sigma_rel))
    assert error.max() < 0.01 * (power_ema(thetas, nearest, step) - direct).abs().max()
    assert int(state["seen"]) == step  # buffers come from the latest snapshot used


@pytest.mark.parametrize("sigma_rel", TRAINED)
def test_trained_length_at_a_snapshot_step_returns_that_snapshot(snapshot_run, sigma_rel):
    run, _ = snapshot_run
    state, report = reconstruct(run / SNAPSHOT_DIR, sigma_rel, 200)
    stored = load_file(str(run / SNAPSHOT_DIR / f"sigma{sigma_rel:g}-step{200:09d}.safetensors"))
    # float64 least-squares reconstruction picks this snapshot (coefficient 1, others ~5e-14): seen 3.6e-15 abs at |theta|~5.6; tightened from rtol 1e-9/atol 1e-12 to rtol 1e-14/atol 1e-13 (>=28x).
    assert torch.allclose(state["theta"], stored["theta"], rtol=1e-14, atol=1e-13), (state["theta"], stored["theta"])
    # fit error of an exactly-stored profile: seen 0.0 in float64; tightened from 1e-6 to 1e-12 (~5000 eps, roundoff of a small Gram solve).
    assert report.fit_error < 1e-12
    for s in report.snapshots:
        # float64 least-squares coefficients: seen 5.1e-14 off the 0/1 pattern; tightened from 1e-6 to 1e-12 (20x).
        assert s["coefficient"] == pytest.approx(float(s["step"] == 200 and s["sigma_rel"] == sigma_rel), abs=1e-12)


def test_snapshot_files_carry_gamma_and_step(snapshot_run):
    run, _ = snapshot_run
    snaps = list_snapshots(run / SNAPSHOT_DIR)
    assert len(snaps) == 2 * STEPS // EVERY and snaps[-1].step == STEPS
    assert {(s.sigma_rel, s.gamma) for s in snaps} == {(s, sigma_rel_to_gamma(s)) for s in TRAINED}
    assert not list((run / SNAPSHOT_DIR).glob(".*"))  # atomic writes leave no temporary files


def test_reconstruction_errors(snapshot_run, tmp_path):
    run, _ = snapshot_run
    with pytest.raises(UserError, match="snapshot_every"):
        reconstruct(tmp_path, 0.1)
    with pytest.raises(UserError, match="before the first"):
        reconstruct(run / SNAPSHOT_DIR, 0.1, EVERY - 1)
    with pytest.raises(UserError, match="reconstructable range"):
        reconstruct(run / SNAPSHOT_DIR, 0.005)
    with pytest.raises(UserError, match="out of range"):
        reconstruct(run / SNAPSHOT_DIR, 0.4)


def test_config_section_is_validated():
    assert TrainConfig().posthoc_ema.snapshot_every == 0  # off by default
    cfg = TrainConfig.from_dict({"posthoc_ema": {"sigma_rels": [0.04, 0.12], "snapshot_every": 100}})
    assert cfg.posthoc_ema.sigma_rels == [0.04, 0.12] and cfg.posthoc_ema.snapshot_every == 100
    for bad, key in [({"sigma_rels": 0.1}, "must be a list"), ({"sigma_rels": [0.5]}, "sigma_rels"),
                     ({"sigma_rels": [0.1, 0.1]}, "distinct"), ({"snapshot_every": -1}, "snapshot_every")]:
        with pytest.raises(UserError, match=key):
            TrainConfig.from_dict({"posthoc_ema": bad})


# ----- the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
    """A tiny exported pipeline plus snapshots of a synthetic weight trajectory (no training needed)."""
    from difflab.nets.unet import UNet
    from difflab.nets.unet_config import UNetConfig
    from difflab.pipelines.diffusion import DiffusionPipeline
    from difflab.schedules import NoiseSchedule

    run = tmp_path_factory.mktemp("ema_cli") / "run"
    torch.manual_seed(0)
    unet = UNet(UNetConfig.from_dict({**TINY_MODEL, "in_channels": 1}))
    DiffusionPipeline(unet, NoiseSchedule.linear(100), resolution=8).save_pretrained(run)
    trackers, g = [PowerEMA(unet, s) for s in TRAINED], torch.Generator().manual_seed(1)
    for i in range(1, 41):
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        for t in trackers:
            t.update(unet, i)
            if i % 4 == 0:
                save_snapshot(run, t)
    return run


def test_cli_writes_a_sampling_ready_model(unet_run, tmp_path, capsys):
    from difflab.pipelines.diffusion import DiffusionPipeline

    code, out, err = run_cli(["ema", str(unet_run), "--length", "0.07"], capsys)
    assert code == 0, err
    assert "model written to" in out and (unet_run / "ema-0.07" / "posthoc_ema.json").is_file()
    pipe = DiffusionPipeline.from_pretrained(unet_run / "ema-0.07")
    expected, _ = reconstruct(unet_run / SNAPSHOT_DIR, 0.07)
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, expected[k])
    assert pipe.extra_config["posthoc_ema"]["sigma_rel"] == 0.07 and pipe.extra_config["posthoc_ema"]["step"] == 40
    assert pipe(num_images=1, num_inference_steps=2, seed=0, progress=False).samples.shape == (1, 1, 8, 8)
    code, _, err = run_cli(["ema", str(unet_run), "--length", "0.1", "--step", "20", "--out", str(tmp_path / "m")], capsys)
    assert code == 0 and (tmp_path / "m" / "model_index.json").is_file(), err


@pytest.mark.parametrize("args,match", [
    (["ema", "{missing}", "--length", "0.1"], "does not exist"),
    (["ema", "{bare}", "--length", "0.1"], "snapshot_every"),
    (["ema", "{run}", "--length", "0.5"], "out of range"),
    (["ema", "{run}", "--length", "0.004"], "reconstructable range"),
    (["ema", "{run}", "--length", "0.1", "--out", "{run}"], "run directory itself"),
])
def test_cli_bad_input_is_one_line(unet_run, tmp_path, capsys, args, match):
    (tmp_path / "bare").mkdir()
    paths = {"missing": str(tmp_path / "nope"), "bare": str(tmp_path / "bare"), "run": str(unet_run)}
    code, _, err = run_cli([a.format(**paths) for a in args], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err
