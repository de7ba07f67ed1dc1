"""Latent diffusion end to end: autoencoder -> diffusion on its cached latents -> decoded samples, through
`difflab train`, DiffusionPipeline, Text2ImagePipeline and `difflab sample`."""

import pytest
import torch
from PIL import Image

from conftest import tiny_config_dict
from difflab.cli import main
from difflab.data import build_dataset
from difflab.nets.autoencoder import AutoencoderKL
from difflab.pipelines.diffusion import DiffusionPipeline, decode_latents
from difflab.pipelines.text2image import Text2ImagePipeline
from difflab.recipes import train
from difflab.training import TrainConfig
from difflab.training.autoencoder import train_autoencoder


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm")
    data = build_dataset("shapes", 16, num_images=64, seed=0)
    train_autoencoder(data, root / "vae", {"base_channels": 8, "norm_groups": 4, "latent_channels": 4}, steps=3,
                      batch_size=8, lr=1e-3, scale_images=16, progress=False)
    d = tiny_config_dict(steps=3)
    d["data"]["autoencoder"] = str(root / "vae")
    d["conditioning"] = {"kind": "text", "dropout": 0.2}
    d["objective"] = {"parameterization": "v"}
    train(TrainConfig.from_dict(d), root / "run", progress=False)
    return root


def test_trains_on_the_scaled_latents_and_caches_them(latent_run):
    pipe = DiffusionPipeline.from_pretrained(latent_run / "run")
    assert pipe.unet.config.in_channels == 4 and pipe.resolution == 4  # 16x16 images, factor 4
    assert (latent_run / "run" / "latents.safetensors").is_file()
    vae = AutoencoderKL.from_pretrained(latent_run / "vae")
    assert pipe.vae.scaling_factor == vae.scaling_factor != 1.0  # computed from data at the end of its training


def test_samples_are_the_decoded_latents(latent_run):
    pipe = DiffusionPipeline.from_pretrained(latent_run / "run")
    out = pipe(num_images=2, num_inference_steps=3, seed=0, progress=False, prompt="a small red circle in the center on a black background")
    assert out.latents.shape == (2, 4, 4, 4) and out.samples.shape == (2, 3, 16, 16)
    scaling = AutoencoderKL.from_pretrained(latent_run / "vae").scaling_factor  # as trained, read from its folder
    with torch.no_grad():
        expected = pipe.vae.decode(out.latents / scaling).clamp(-1, 1)  # Rombach et al. 2022, sec. 4.3.2, by hand
    # Same float32 decoder on the same input; only the division's rounding could differ: default float32 tolerance.
    torch.testing.assert_close(out.samples, expected)


def test_decode_latents_undoes_the_latent_scaling():
    """With a known linear decoder D(z) = 3 z + 1 and scaling s = 0.25: decode_latents(z) = D(z / s) = 12 z + 1."""
    class Linear:
        scaling_factor = 0.25

        def decode(self, z: torch.Tensor) -> torch.Tensor:
            return 3 * z + 1

    z = torch.linspace(-2, 2, 24).reshape(1, 4, 2, 3)
    # float32: / 0.25 is exact (a power of two); 3 (4 z) + 1 and 12 z + 1 round twice each, |values| <= 25 < 32
    # where one ulp is 2^-19: at most 4 ulp apart.
    torch.testing.assert_close(decode_latents(Linear(), z), 12 * z + 1, rtol=0, atol=4 * 2**-19)


def test_text2image_pipeline_loads_the_trained_folder(latent_run, tmp_path):
    pipe = Text2ImagePipeline.from_pretrained(latent_run / "run")
    out = pipe("a large blue square in the top left on a white background", num_inference_steps=3,
               generator=torch.Generator().manual_seed(0), progress=False, guidance_scale=2.0)
    assert out.images[0].size == (16, 16)
    ref = DiffusionPipeline.from_pretrained(latent_run / "run")(
        num_images=1, num_inference_steps=3, seed=0, progress=False, sampler="dpmpp_2m", guidance_scale=2.0,
        prompt="a large blue square in the top left on a white background")
    # float32, both pipelines run the same 3 dpmpp_2m steps and decoder, |x| <= 1: seen 0; 1e-5 ~ 84 ulps at 1, for op-order differences.
    torch.testing.assert_close(out.samples.clamp(-1, 1), ref.samples, atol=1e-5, rtol=0)
    pipe.save_pretrained(tmp_path / "t2i")
    again = Text2ImagePipeline.from_pretrained(tmp_path / "t2i")
    out2 = again("a large blue square in the top left on a white background", num_inference_steps=3,
                 generator=torch.Generator().manual_seed(0), progress=False, guidance_scale=2.0)
    torch.testing.assert_close(out2.samples, out.samples)


def test_cli_sample_prompt_on_a_latent_model(latent_run, tmp_path):
    """The CLI grid holds the decoded images the Python API gives for the same seed, sampler and guidance."""
    import numpy as np

    grid = tmp_path / "grid.png"
    prompt = "a small green triangle in the center on a gray background"
    main(["sample", "--model", str(latent_run / "run"), "--prompt", prompt, "--num-images", "2", "--steps", "2",
          "--guidance-scale", "3", "--sampler", "ddim", "--out", str(grid), "--no-progress"])
    ref = DiffusionPipeline.from_pretrained(latent_run / "run")(num_images=2, num_inference_steps=2, seed=0, progress=False,
                                                               sampler="ddim", prompt=prompt, guidance_scale=3.0)
    tiles = np.asarray(Image.open(grid).convert("RGB"))
    assert tiles.shape == (16 + 4, 2 * 16 + 6, 3)  # one row of two 16x16 images, 2-pixel padding
    for i, image in enumerate(ref.images):
        assert np.array_equal(tiles[2:18, 2 + 18 * i:18 + 18 * i], np.asarray(image))
