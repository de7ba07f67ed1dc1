"""The KL autoencoder: shapes, the Gaussian posterior against closed forms, training, persistence, latents, CLI."""

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli
from difflab.data import build_dataset
from difflab.data.latents import LatentDataset, encode_dataset
from difflab.errors import UserError
from difflab.nets.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian, check_latent_size
from difflab.nets.discriminator import PatchDiscriminator, patch_layers
from difflab.noise import NoiseSource
from difflab.training.autoencoder import latent_scaling_factor, train_autoencoder
from difflab.training.autoencoder_loss import adaptive_gan_weight, laplacian_pyramid, pyramid_l1, reconstruction_loss
from difflab.training.checkpoint import find_checkpoint, load_checkpoint

TINY = {"base_channels": 8, "norm_groups": 4, "latent_channels": 4}


def tiny_ae(seed=0, **kw):
    torch.manual_seed(seed)
    return AutoencoderKL(AutoencoderConfig(**{**TINY, **kw}))


@pytest.fixture(scope="module")
def shapes16():
    return build_dataset("shapes", 16, num_images=64, seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes16):
    out = tmp_path_factory.mktemp("ae") / "run"
    result = train_autoencoder(shapes16, out, {**TINY, "base_channels": 16, "norm_groups": 8}, steps=30, batch_size=8,
                               lr=2e-3, scale_images=64, progress=False)
    return out, result


# ----- the network -----------------------------------------------------------------------------
@pytest.mark.parametrize("mults,factor", [((1, 2, 2), 4), ((1, 2, 2, 4), 8)])
def test_shapes_and_factor(mults, factor):
    ae = tiny_ae(channel_mults=mults, latent_channels=3)
    assert ae.downsample_factor == factor and ae.latent_channels == 3
    x = torch.rand(2, 3, 32, 16) * 2 - 1
    posterior = ae.encode(x)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 3, 32 // factor, 16 // factor)
    rec, post = ae(x, torch.Generator().manual_seed(0))
    assert rec.shape == x.shape and ae.decode(post.mode()).shape == x.shape


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    posterior = DiagonalGaussian(mean, logvar)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    # float32 KL summed over 16 latent entries (|KL| up to ~24): seen 1.9e-6 abs, i.e. 1/66 of atol 1e-5 + rtol 1e-5*|KL|.
    torch.testing.assert_close(posterior.kl(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(posterior.std, q.stddev)
    assert DiagonalGaussian(mean, torch.full_like(mean, 100.0)).logvar.max() == 20.0  # clamped


def test_sample_moments_and_per_sample_noise():
    mean, logvar = torch.tensor([1.0, -2.0]).view(1, 2, 1, 1), torch.tensor([0.0, math.log(4.0)]).view(1, 2, 1, 1)
    big = DiagonalGaussian(mean.expand(20000, 2, 1, 1), logvar.expand(20000, 2, 1, 1))
    z = big.sample(torch.Generator().manual_seed(1)).flatten(1)
    torch.testing.assert_close(z.mean(0), torch.tensor([1.0, -2.0]), atol=0.05, rtol=0)  # 4 sigma of the mean
    # statistical: n = 2e4 draws, se of the sample std ~ sigma/sqrt(2n) = 0.01 for sigma = 2, so 0.05 = 5 se (seen 0.0097).
    torch.testing.assert_close(z.std(0), torch.tensor([1.0, 2.0]), atol=0.05, rtol=0)
    pair = DiagonalGaussian(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2))
    both = pair.sample(NoiseSource.from_seeds([7, 8]))
    alone = DiagonalGaussian(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).sample(NoiseSource.from_seeds([8]))
    assert torch.equal(both[1:], alone)


# ----- losses ----------------------------------------------------------------------------------
def test_laplacian_pyramid_reconstructs_and_l1_of_a_shift():
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    bands = laplacian_pyramid(x, 4)
    assert [b.shape[-1] for b in bands] == [16, 8, 4, 2]
    rebuilt = bands[-1]
    for band in reversed(bands[:-1]):
        rebuilt = band + torch.nn.functional.interpolate(rebuilt, scale_factor=2.0, mode="nearest")
    # float32 Laplacian pyramid rebuilt over 3 levels (~3 adds/upsamples per pixel, |x| up to ~4): seen 2.4e-7 (~1 ulp at 4); 1e-5 = 42x.
    torch.testing.assert_close(rebuilt, x, rtol=0, atol=1e-5)
    # a constant shift lives only in the coarsest level
    # float32, a constant 0.25 shift averaged in the coarsest level: seen 0; 1e-6 ~ 34 ulps of 0.25.
    torch.testing.assert_close(pyramid_l1(x + 0.25, x), torch.full((2,), 0.25), rtol=0, atol=1e-6)


def test_adaptive_gan_weight_is_the_gradient_norm_ratio():
    w = torch.nn.Parameter(torch.zeros(3))
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])
    weight = adaptive_gan_weight((w * a).sum(), (w * b).sum(), w)
    assert weight.item() == pytest.approx(5.0 / (1.0 + 1e-4))


@pytest.mark.parametrize("resolution", [8, 12, 16, 32, 64])
def test_patch_discriminator_keeps_a_logit_map(resolution):
    d = PatchDiscriminator(3, resolution, base_channels=8, norm_groups=4)
    out = d(torch.zeros(1, 3, resolution, resolution))
    assert out.shape[:2] == (1, 1) and min(out.shape[2:]) >= 1
    with pytest.raises(UserError, match="at least 8 pixels"):
        patch_layers(4)


# ----- training --------------------------------------------------------------------------------
def test_reconstruction_improves(trained, shapes16):
    out, result = trained
    x = torch.stack([shapes16[i]["x"] for i in range(16)])
    torch.manual_seed(0)  # the trainer's initialisation for seed 0
    fresh = AutoencoderKL(AutoencoderConfig(**{**TINY, "base_channels": 16, "norm_groups": 8}))
    model = AutoencoderKL.from_pretrained(out)
    with torch.no_grad():  # the training objective (without KL) on a fixed batch, from the posterior mean
        before, after = (reconstruction_loss(x, m.decode(m.encode(x).mode()), 1.0) for m in (fresh, model))
    objective = [(t["l1"] + t["perceptual"]).mean().item() for t in (before, after)]
    assert result.step == 30 and objective[1] < 0.75 * objective[0], objective
    assert after["l1"].mean() < 0.8 * before["l1"].mean()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 30 and {"l1", "perceptual", "kl", "loss"} <= set(log[0])


def test_scaling_factor_is_one_over_latent_std(trained, shapes16):
    out, result = trained
    model = AutoencoderKL.from_pretrained(out)
    x = torch.stack([shapes16[i]["x"] for i in range(len(shapes16))])
    with torch.no_grad():
        std = model.encode(x).mean.double().std().item()
    assert json.loads((out / "config.json").read_text())["config"]["scaling_factor"] == result.scaling_factor
    # float32 latents, std taken in float64 by the same code path: seen 0; rel 1e-6 ~ 8 float32 eps.
    assert model.scaling_factor == pytest.approx(1.0 / std, rel=1e-6)
    # same computation through latent_scaling_factor: seen 0; rel 1e-6 ~ 8 float32 eps.
    assert latent_scaling_factor(model, shapes16, 64) == pytest.approx(1.0 / std, rel=1e-6)
    # float32 latents * scale, std in float64 over ~1e3 values: seen 3.0e-8 rel; 1e-5 = 330x.
    assert LatentDataset(shapes16, model).images().double().std().item() == pytest.approx(1.0, rel=1e-5)


def test_resume_repeats_an_uninterrupted_run(tmp_path, shapes16):
    kw = {"config": TINY, "batch_size": 4, "lr": 1e-3, "gan_start": 1, "scale_images": 8, "progress": False}
    train_autoencoder(shapes16, tmp_path / "a", steps=4, **kw)
    train_autoencoder(shapes16, tmp_path / "b", steps=2, **kw)
    with pytest.raises(UserError, match="already holds an autoencoder run"):
        train_autoencoder(shapes16, tmp_path / "b", steps=4, **kw)
    with pytest.raises(UserError, match="lr differ"):
        train_autoencoder(shapes16, tmp_path / "b", steps=4, resume=True, **{**kw, "lr": 2e-3})
    train_autoencoder(shapes16, tmp_path / "b", steps=4, resume=True, **kw)
    tensors, state = load_checkpoint(find_checkpoint(tmp_path / "a"))
    assert state["step"] == 4 and "d_loss" in state["smoothed"]
    assert any(k.startswith("discriminator.") for k in tensors["model"])  # the checkpoint holds D, the export not
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a.keys() == AutoencoderKL(AutoencoderConfig(**TINY)).state_dict().keys()


# ----- persistence -----------------------------------------------------------------------------
def test_save_load_round_trip_is_bitwise(tmp_path):
    ae = tiny_ae(seed=3, channel_mults=(1, 2, 2, 4), scaling_factor=0.37)
    ae.save_pretrained(tmp_path / "m")
    loaded = AutoencoderKL.from_pretrained(tmp_path / "m")
    assert loaded.config == ae.config and loaded.scaling_factor == 0.37
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in ae.state_dict().items())
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(ae.eval().decode(ae.encode(x).mode()), loaded.decode(loaded.encode(x).mode()))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]


# ----- latent datasets -------------------------------------------------------------------------
def test_latent_dataset_items_and_cache(tmp_path, shapes16):
    ae = tiny_ae(scaling_factor=2.5)
    base = build_dataset("shapes", 16, num_images=10, seed=1)
    cache = tmp_path / "latents.safetensors"
    ds = LatentDataset(base, ae, batch_size=3, cache_path=cache)
    assert (len(ds), ds.sample_shape, ds.image_shape) == (10, (4, 4, 4), (3, 16, 16)) and not ds.from_cache
    with torch.no_grad():
        expected = ae.encode(torch.stack([base[i]["x"] for i in range(10)])).mean * 2.5
    # float32 encoder in batches of 3 vs one batch of 10 (different GEMM blocking, ~1e3 MACs/output, |y| up to 1.8): seen 1.25e-6 abs, 0.42 of atol 1e-6 + rtol 1e-5*|y| -> 2.4x margin (kept).
    torch.testing.assert_close(ds.images(), expected, rtol=1e-5, atol=1e-6)
    assert ds[3]["cond"]["caption"] == base[3]["cond"]["caption"] and ds[3]["cond"]["label"] == base[3]["cond"]["label"]
    again = LatentDataset(base, ae, cache_path=cache)
    assert again.from_cache and torch.equal(again.images(), ds.images())
    other = tiny_ae(seed=1, scaling_factor=2.5)
    with pytest.warns(UserWarning, match="another autoencoder or dataset"):
        assert not LatentDataset(base, other, cache_path=cache).from_cache
    with pytest.warns(UserWarning, match="another autoencoder or dataset"):
        assert not LatentDataset(shapes16, other, cache_path=cache).from_cache
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LatentDataset(shapes16, other, cache_path=cache).from_cache
    torch.testing.assert_close(encode_dataset(ae, base, 4, [2, 5]), encode_dataset(ae, base, 1)[[2, 5]])


# ----- errors ----------------------------------------------------------------------------------
def test_bad_sizes_name_the_nearest_valid_ones():
    with pytest.raises(UserError, match="30x32 .* factor 8; use height 24 or 32 and width 32"):
        check_latent_size(30, 32, 8)
    assert check_latent_size(24, 32, 8) == (3, 4)
    with pytest.raises(UserError, match="height 4 and width 4 or 8"):
        tiny_ae().encode(torch.zeros(1, 3, 4, 6))
    with pytest.raises(UserError, match=r"expected \(B, 3, H, W\)"):
        tiny_ae().encode(torch.zeros(1, 1, 8, 8))
    with pytest.raises(UserError, match="use height 8"):
        train_autoencoder("shapes", "/nonexistent/never", TINY | {"channel_mults": (1, 2, 2, 4)}, resolution=12,
                          num_images=4, progress=False)


@pytest.mark.parametrize("bad,match", [
    ({"channel_mults": ()}, "channel_mults"), ({"base_channels": 0}, "base_channels=0"),
    ({"latent_channels": 2.5}, "latent_channels"), ({"scaling_factor": -1.0}, "scaling_factor"),
    ({"mid_attention": "yes"}, "mid_attention"), ({"channel_mult": [1]}, "unknown AutoencoderConfig key"),
])
def test_bad_config(bad, match):
    with pytest.raises(UserError, match=match):
        AutoencoderConfig.from_dict(bad)


def test_from_pretrained_refuses_other_models(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format": "difflab.diffusion/1", "model_type": "noisy_classifier"}))
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="not an autoencoder"):
        AutoencoderKL.from_pretrained(tmp_path)


# ----- command line ----------------------------------------------------------------------------


def test_cli_happy_path_and_errors(tmp_path, capsys):
    base = ["train-autoencoder", "--dataset", "shapes", "--num-images", "16", "--steps", "2", "--batch-size", "2",
            "--base-channels", "8", "--latent-channels", "2", "--no-progress"]
    code, out, err = run_cli([*base, "--resolution", "16", "--factor", "8", "--out", str(tmp_path / "m")], capsys)
    assert code == 0 and "trained 2 steps" in out and "scaling factor" in out, err
    model = AutoencoderKL.from_pretrained(tmp_path / "m")
    assert model.downsample_factor == 8 and model.latent_channels == 2
    for extra, match in ((["--resolution", "12"], "use height 8 or 16 and width 8 or 16"),
                         (["--resolution", "16", "--lr", "0"], "lr=0.0 is invalid"),
                         (["--resolution", "16", "--gan-start", "-1"], "--gan-start must be >= 0")):
        code, _, err = run_cli([*base, "--factor", "8", *extra, "--out", str(tmp_path / "x")], capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and match in err, err
