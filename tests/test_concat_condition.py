"""The concat condition (SR3 / cascaded diffusion): noise-conditioning augmentation against q(z_s | c),
dropout, row independence, the UNet's concat input and the CFG pair.

Statistics use N = 20000 draws; a mean over N has standard error sd / sqrt(N) and a sample std about
sd / sqrt(2N), so a 5-SE tolerance fails a correct implementation with probability < 1e-6 per entry.
"""

import math

import pytest
import torch

from difflab.conditioning import AUG_EMBED_SCALE, ConcatCondition, Conditioner
from difflab.denoiser import Denoiser
from difflab.errors import UserError
from difflab.nets.unet import UNet, UNetConfig
from difflab.pipelines.diffusion import DiffusionPipeline, guided_denoiser
from difflab.schedules import NoiseSchedule

N = 20000
Z = 5.0


def linear_alpha_bar(t: int) -> float:
    """alpha_bar at index t of the linear schedule (Ho et al. 2020: beta from 1e-4 to 0.02 over T = 1000)."""
    betas = [1e-4 + i / 999 * (0.02 - 1e-4) for i in range(1000)]
    return math.prod(1 - b for b in betas[: t + 1])


def tiny_unet(**fields) -> UNet:
    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=3, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                          attention_levels=(1,), head_channels=16, norm_groups=8, **fields))
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)  # conv_out starts at zero; make the output depend on the input
    return net.eval()


def test_fixed_level_matches_forward_process():
    cond = ConcatCondition(channels=2, noise_aug_max=1.0)
    c = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    kwargs, _ = cond.sampling_pair(N, c, aug_level=0.3, noise=torch.Generator().manual_seed(2))
    z = kwargs["concat"].double()
    alpha_bar = linear_alpha_bar(299)  # s = 0.3 is index t = 0.3 T - 1 = 299
    alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    mean_err = (z.mean(0) - alpha * c[0].double()).abs().max().item()
    std_err = (z.std(0) - sigma).abs().max().item()
    assert mean_err < Z * sigma / math.sqrt(N)
    assert std_err < Z * sigma / math.sqrt(2 * N)
    assert torch.allclose(kwargs["aug_level"], torch.full((N,), 0.3 * AUG_EMBED_SCALE))


def test_zero_level_is_clean_and_needs_no_noise():
    cond = ConcatCondition(channels=2, noise_aug_max=0.5)
    c = torch.randn(3, 2, 4, 4)
    kwargs, _ = cond.sampling_pair(3, c)
    assert torch.equal(kwargs["concat"], c) and torch.equal(kwargs["aug_level"], torch.zeros(3))


def test_training_levels_are_uniform_and_each_row_is_q_at_its_level():
    cond = ConcatCondition(channels=1, noise_aug_max=0.4)
    c = torch.full((N, 1, 2, 2), 0.7)
    out = cond.prepare(c, torch.zeros(N, dtype=torch.bool), torch.Generator().manual_seed(3))
    s = out[cond.level_key]
    assert 0 <= s.min() and s.max() <= 0.4
    for q in (0.1, 0.5, 0.9):  # quantiles of U[0, 0.4]; an empirical quantile's SE is sqrt(q(1-q)/N) / density
        assert abs(torch.quantile(s, q).item() - 0.4 * q) < Z * 0.4 * math.sqrt(q * (1 - q) / N)
    schedule = NoiseSchedule.linear(1000)
    t = s * 1000 - 1
    alpha, sigma = schedule.alpha(t).reshape(-1, 1, 1, 1), schedule.sigma(t).reshape(-1, 1, 1, 1)
    e = (out["low_res"].double() - alpha * 0.7) / sigma  # the noise eps, standard normal if z_s ~ q(z_s | c)
    assert abs(e.mean().item()) < Z / math.sqrt(4 * N)
    assert abs(e.std().item() - 1) < Z / math.sqrt(8 * N)


def test_dropout_rows_get_the_null_value_at_the_rate():
    p = 0.25
    cond = Conditioner("class", num_classes=3, concat=ConcatCondition(channels=2, noise_aug_max=0.2, dropout=p))
    labels = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(4))
    drop = torch.rand(N, generator=torch.Generator().manual_seed(5)) < 0.1
    out = cond.prepare({"label": labels, "low_res": torch.ones(N, 2, 2, 2)}, drop, torch.Generator().manual_seed(6))
    null = out["low_res"].flatten(1).eq(0).all(1)
    assert abs(null.double().mean().item() - p) < Z * math.sqrt(p * (1 - p) / N)
    assert torch.equal(out["low_res_aug_level"][null], torch.zeros(int(null.sum()), dtype=torch.float64))
    assert torch.equal(out["label"], torch.where(drop, 3, labels))  # class rows follow `drop`, to the null label 3


def test_row_i_of_prepare_depends_only_on_row_i():
    cond = Conditioner("class", num_classes=4, concat=ConcatCondition(channels=2, noise_aug_max=0.5, dropout=0.3))
    batch = {"label": torch.tensor([0, 1, 2, 3, 1, 2]), "low_res": torch.randn(6, 2, 4, 4)}
    drop = torch.tensor([False, True, False, False, True, False])
    other = {"label": batch["label"].clone(), "low_res": batch["low_res"].clone()}
    other["label"][2], other["low_res"][2] = 0, torch.randn(2, 4, 4)
    a = cond.prepare(batch, drop, torch.Generator().manual_seed(7))
    b = cond.prepare(other, drop, torch.Generator().manual_seed(7))
    keep = torch.arange(6) != 2
    for key in a:
        assert torch.equal(a[key][keep], b[key][keep]), key
    sliced = cond.network_kwargs({k: v[3:] for k, v in a.items()}, "cpu")
    full = cond.network_kwargs(a, "cpu")
    assert all(torch.equal(sliced[k], full[k][3:]) for k in full)


def test_unet_concat_output_has_data_channels_and_depends_on_concat():
    net = tiny_unet(**ConcatCondition(channels=2, noise_aug_max=0.5).unet_fields())
    x, low = torch.randn(2, 3, 16, 16), torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        out = net(x, 10.0, concat=low, aug_level=torch.tensor([0.0, 200.0]))
        assert out.shape == x.shape
        assert not torch.allclose(out, net(x, 10.0, concat=low + 1, aug_level=torch.tensor([0.0, 200.0])))
        assert not torch.allclose(out, net(x, 10.0, concat=low, aug_level=torch.tensor([300.0, 200.0])))
    with pytest.raises(UserError, match="concat condition of 2 channels"):
        net(x, 10.0)


def test_denoiser_scales_only_x_not_the_concat():
    seen = {}

    def model(x, t, concat):
        seen["x"], seen["concat"] = x, concat
        return torch.zeros_like(x)

    x, low = torch.randn(2, 3, 4, 4), torch.randn(2, 2, 4, 4)
    Denoiser(model, NoiseSchedule.linear(100), "edm")(x, 50.0, concat=low)
    assert torch.equal(seen["concat"], low) and not torch.allclose(seen["x"], x)


def test_cfg_pairing_keeps_the_concat_in_both_branches():
    cond = Conditioner("class", num_classes=3, concat=ConcatCondition(channels=2))
    low = torch.randn(2, 2, 4, 4)
    c, u = cond.sampling_kwargs(2, class_labels=[0, 2], concat={"low_res": low})
    assert torch.equal(c["concat"], low) and torch.equal(u["concat"], low)
    assert c["class_labels"].tolist() == [0, 2] and u["class_labels"].tolist() == [3, 3]
    seen = {}

    def model(x, t, class_labels, concat):
        seen["labels"], seen["concat"] = class_labels, concat
        return torch.zeros_like(x)

    den = guided_denoiser(Denoiser(model, NoiseSchedule.linear(100)), cond, torch.device("cpu"), 2,
                          class_labels=[0, 2], guidance_scale=3.0, concat={"low_res": low})
    den(torch.randn(2, 3, 4, 4), 50.0)
    assert seen["labels"].tolist() == [0, 2, 3, 3] and torch.equal(seen["concat"], torch.cat([low, low]))


def test_config_round_trip_and_old_configs(tmp_path):
    cond = Conditioner("class", num_classes=3, class_names=["a", "b", "c"],
                       concat=ConcatCondition(key="first_frame", channels=2, noise_aug_max=0.25, dropout=0.1,
                                              resize="nearest", schedule="cosine"))
    again = Conditioner.from_config(cond.to_config())
    assert again.to_config() == cond.to_config() and again.concat.schedule.config["kind"] == "cosine"
    assert Conditioner.from_config({"kind": "class", "num_classes": 3}).concat is None
    pipe = DiffusionPipeline(tiny_unet(**cond.unet_fields()), NoiseSchedule.linear(100), sample_shape=(3, 16, 16),
                             conditioner=cond)
    pipe.save_pretrained(tmp_path / "m")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "m")
    assert loaded.conditioner.to_config() == cond.to_config()
    out = loaded(num_images=2, num_inference_steps=2, seed=0, progress=False, class_labels=1,
                 concat={"first_frame": torch.randn(1, 2, 8, 8)}, aug_level=0.1, guidance_scale=2.0)
    assert out.samples.shape == (2, 3, 16, 16)


def test_bad_levels_are_user_errors():
    with pytest.raises(UserError, match="noise_aug_max"):
        ConcatCondition(noise_aug_max=2.0)
    with pytest.raises(UserError, match="trained with noise augmentation"):
        ConcatCondition(channels=2).sampling_pair(1, torch.zeros(1, 2, 4, 4), aug_level=0.2)
