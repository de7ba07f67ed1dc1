"""InpaintPipeline, outpainting, Img2ImgPipeline and their CLI commands on tiny trained folders: known pixels
exact (also through PNG files and for a latent model with its seam), strength 1 equal to generation, bad input."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli, tiny_config_dict
from difflab.errors import UserError
from difflab.pipelines.diffusion import DiffusionPipeline
from difflab.pipelines.edit import Img2ImgPipeline, InpaintPipeline, seam_overlay
from difflab.recipes import train
from difflab.training import TrainConfig

V1_LATENT = Path(__file__).parent / "fixtures" / "v1" / "latent"


@pytest.fixture(scope="module")
def pixel_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("edit") / "run"
    train(TrainConfig.from_dict(tiny_config_dict(steps=2)), out, progress=False)
    return out


@pytest.fixture
def picture(tmp_path):
    """A 16x16 RGB PNG with every byte value used, and a mask whose right half is white (fill)."""
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, 8:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return pixels, tmp_path / "in.png", tmp_path / "mask.png"


@pytest.mark.parametrize("method, options", [("repaint", {"jump": 2, "resample": 2}), ("replacement", {"sampler": "ddim"})])
def test_inpaint_pipeline_keeps_known_pixels_exactly(pixel_model, picture, method, options, one_thread):
    pixels, image, mask = picture
    pipe = InpaintPipeline.from_pretrained(pixel_model)
    out = pipe(image, mask, num_inference_steps=6, method=method, seed=0, progress=False, **options)
    got = np.asarray(out.images[0])
    assert np.array_equal(got[:, :8], pixels[:, :8])  # max abs error 0 in 8-bit pixels
    assert np.abs(got[:, 8:].astype(int) - pixels[:, 8:]).max() > 0  # the right half was filled


def test_outpaint_extends_the_canvas_and_keeps_the_picture(pixel_model, picture, one_thread):
    pixels, image, _ = picture
    out = InpaintPipeline.from_pretrained(pixel_model).outpaint(image, [0, 2, 4, 2], num_inference_steps=4,
                                                                 method="replacement", seed=0, progress=False)
    got = np.asarray(out.images[0])
    assert got.shape == (20, 20, 3) and np.array_equal(got[2:18, 0:16], pixels)


def test_img2img_at_strength_one_is_generation_and_low_strength_stays_close(pixel_model, picture, one_thread):
    _, image, _ = picture
    edit, plain = Img2ImgPipeline.from_pretrained(pixel_model), DiffusionPipeline.from_pretrained(pixel_model)
    a = edit(image, 1.0, 5, "ddim", seed=3, progress=False)
    b = plain(num_images=1, num_inference_steps=5, sampler="ddim", seed=3, progress=False)
    assert a.nfe == b.nfe == 5 and torch.equal(a.samples, b.samples)
    x = torch.from_numpy(np.array(Image.open(image))).permute(2, 0, 1).float() / 127.5 - 1
    near = edit(image, 0.2, 5, "ddim", seed=3, progress=False).samples[0]
    assert (near - x).norm() < (a.samples[0] - x).norm()


def test_latent_inpainting_overlays_known_pixels_and_blends_the_seam(one_thread):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pipe = InpaintPipeline.from_pretrained(V1_LATENT)
    f = pipe.vae.downsample_factor
    size = pipe.sample_shape[-1] * f
    image = torch.rand(1, pipe.vae.config.in_channels, size, size) * 2 - 1
    fill = torch.zeros(size, size)
    fill[:, size // 2:] = 1
    out = pipe(image, fill, num_inference_steps=4, method="replacement", seed=0, progress=False)
    assert torch.equal(out.samples[..., : size // 2], image[..., : size // 2])


def test_seam_overlay_weights_fall_linearly_into_the_hole():
    known, generated = torch.zeros(1, 1, 1, 8), torch.ones(1, 1, 1, 8)
    keep = torch.tensor([True, True, False, False, False, False, False, False]).reshape(1, 1, 1, 8)
    out = seam_overlay(generated, known, keep, width=4)
    # distance d to the known region is 1, 2, 3, 4, ... for pixels 2, 3, ...: weight of known 1 - d / 4
    assert torch.allclose(out.flatten(), torch.tensor([0, 0, 0.25, 0.5, 0.75, 1, 1, 1]))


def test_bad_editing_input(pixel_model, picture, tmp_path, capsys):
    pixels, image, mask = picture
    pipe = InpaintPipeline.from_pretrained(pixel_model)
    Image.fromarray(np.zeros((12, 10), dtype=np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(UserError, match="the mask is 10x12 pixels but the image is 16x16"):
        pipe(image, tmp_path / "small.png", 4, progress=False)
    Image.fromarray(pixels[:15, :13]).save(tmp_path / "odd.png")
    with pytest.raises(UserError, match="the image is 13x15 pixels, but this model needs sides divisible by 2; "
                                        "resize or crop it to width 12 or 14 and height 14 or 16"):
        pipe(tmp_path / "odd.png", np.zeros((15, 13)), 4, progress=False)
    with pytest.raises(UserError, match=r"strength must lie in \(0, 1\]"):
        Img2ImgPipeline.from_pretrained(pixel_model)(image, 1.5, 4, progress=False)
    code, _, err = run_cli(["outpaint", "--model", str(pixel_model), "--image", str(image), "--pad", "a,b",
                            "--out", str(tmp_path / "o.png")], capsys)
    assert code == 2 and err.strip() == "error: --pad 'a,b' is invalid; give ALL, or H,V, or L,T,R,B in pixels, e.g. 0,0,16,0"


def test_cli_inpaint_outpaint_img2img(pixel_model, picture, tmp_path, capsys, one_thread):
    pixels, image, mask = picture
    common = ["--model", str(pixel_model), "--image", str(image), "--no-progress"]
    code, out, _ = run_cli(["inpaint", *common, "--mask", str(mask), "--steps", "4", "--jump", "2", "--resample", "2",
                            "--out", str(tmp_path / "a.png")], capsys)
    assert code == 0 and "inpainted (repaint)" in out
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png"))[:, :8], pixels[:, :8])
    code, _, _ = run_cli(["outpaint", *common, "--pad", "2", "--steps", "3", "--method", "replacement",
                          "--out", str(tmp_path / "b.png")], capsys)
    assert code == 0 and Image.open(tmp_path / "b.png").size == (20, 20)
    code, out, _ = run_cli(["img2img", *common, "--strength", "0.5", "--steps", "4", "--out", str(tmp_path / "c.png")], capsys)
    assert code == 0 and "2 network evaluations" in out


def test_tiled_outpainting_grows_a_strip_window_by_window(pixel_model, picture, one_thread):
    """The tiny model is 16x16: extending a 16x16 picture by 20 pixels to the right takes windows adding 8, 8, 4
    pixels; the picture stays exact, and each window's evaluations add up."""
    pixels, image, _ = picture
    pipe = InpaintPipeline.from_pretrained(pixel_model)
    out = pipe.outpaint(image, [0, 0, 20, 0], tile=True, num_inference_steps=3, method="replacement", seed=0, progress=False)
    got = np.asarray(out.images[0])
    assert got.shape == (16, 36, 3) and np.array_equal(got[:, :16], pixels) and out.nfe == 3 * 3
    left = pipe.outpaint(image, [6, 0, 0, 0], tile=True, num_inference_steps=3, method="replacement", seed=0, progress=False)
    assert np.array_equal(np.asarray(left.images[0])[:, 6:], pixels)
    with pytest.raises(UserError, match="needs the picture's other side to be the model's 16 pixels, got 20"):
        pipe.outpaint(out.samples[:, :, :, :20].permute(0, 1, 3, 2), [0, 0, 4, 0], tile=True, num_inference_steps=2,
                      progress=False)
