"""img2img and inpainting with a Stable-Diffusion diffusers folder (a tiny random one built locally): SDEdit at
strength 1 equals generation on the same grid and noise; inpainted known pixels equal the input exactly."""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from sd_tiny import build_sd_folder  # noqa: E402
from difflab.errors import UserError  # noqa: E402
from difflab.pipelines.text2image import Text2ImagePipeline  # noqa: E402


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return Text2ImagePipeline.from_pretrained(build_sd_folder(tmp_path_factory.mktemp("tiny") / "sd"))


def gens(n, base=0):
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def test_sd_img2img_at_strength_one_is_generation(sd, one_thread):
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    edited = sd.img2img(image, "a red circle", 1.0, num_inference_steps=4, guidance_scale=3.0, generator=gens(2), progress=False)
    plain = sd("a red circle", num_inference_steps=4, guidance_scale=3.0, generator=gens(2), grid="logsnr",
               num_images_per_prompt=2, progress=False)
    assert edited.nfe == plain.nfe == 4 and torch.equal(edited.latents, plain.latents)
    low = sd.img2img(image, "a red circle", 0.5, num_inference_steps=4, guidance_scale=3.0, generator=gens(2), progress=False)
    assert low.nfe == 2 and low.images[0].size == (32, 32)


def test_sd_inpainting_keeps_known_pixels_exactly(sd, one_thread):
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    fill = torch.zeros(32, 32)
    fill[8:24, 8:24] = 1
    out = sd.inpaint(image, fill, "a blue square", num_inference_steps=4, method="replacement", sampler="ddim",
                     generator=gens(1), progress=False)
    keep = fill == 0
    assert torch.equal(out.samples[:, :, keep], image[:, :, keep])
    rep = sd.inpaint(image, fill, "a blue square", num_inference_steps=4, jump=2, resample=2, generator=gens(1), progress=False)
    assert torch.equal(rep.samples[:, :, keep], image[:, :, keep]) and rep.nfe == 4 + 1 * 2 * 1
    with pytest.raises(UserError, match="not available for a text-to-image folder"):
        sd.inpaint(image, fill, "x", method="trained", progress=False)


def test_cli_edits_with_a_stable_diffusion_folder(tmp_path_factory, tmp_path, capsys, one_thread):
    import numpy as np
    from PIL import Image

    from conftest import run_cli

    folder = build_sd_folder(tmp_path_factory.mktemp("tiny_cli") / "sd")
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, 16:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = ["--model", str(folder), "--image", str(tmp_path / "in.png"), "--no-progress"]
    code, _, err = run_cli(["img2img", *common, "--prompt", "a circle", "--steps", "4", "--out", str(tmp_path / "a.png")], capsys)
    assert code == 0, err
    code, _, err = run_cli(["inpaint", *common, "--prompt", "a circle", "--mask", str(tmp_path / "mask.png"), "--steps", "4",
                            "--jump", "2", "--resample", "2", "--out", str(tmp_path / "b.png")], capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png"))[:, :16], pixels[:, :16])
    code, _, err = run_cli(["img2img", *common, "--out", str(tmp_path / "c.png")], capsys)
    assert code == 2 and "needs --prompt" in err
