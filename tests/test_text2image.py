"""Text2ImagePipeline on difflab's own networks (latent and pixel space), its folders, and `difflab sample --prompt`."""

import numpy as np
import pytest
import torch
from PIL import Image
from sd_tiny import build_sd_folder

from difflab.cli import main
from difflab.conditioning import Conditioner
from difflab.data.images import to_pil_grid
from difflab.errors import UserError
from difflab.nets.autoencoder import AutoencoderConfig, AutoencoderKL
from difflab.nets.unet import UNet
from difflab.nets.unet_config import UNetConfig
from difflab.pipelines.diffusion import DiffusionPipeline
from difflab.pipelines.text2image import Text2ImagePipeline
from difflab.schedules import NoiseSchedule

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]
PROMPTS = ["a red circle", "circle"]
CALL = {"num_inference_steps": 4, "guidance_scale": 3.0, "sampler": "ddim", "progress": False}


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return build_sd_folder(tmp_path_factory.mktemp("tiny") / "sd")


def randomised(module, seed):
    """Fresh random weights everywhere (difflab zero-initialises output layers, which would make eps = 0)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.1)
    return module.eval()


def diffusion_pipeline(sd_dir, in_channels, resolution):
    """A text-conditional difflab model reading prompts with difflab's CLIP encoder (the tiny SD text model)."""
    spec = {"kind": "clip", "path": str(sd_dir / "text_encoder"), "tokenizer_path": str(sd_dir / "tokenizer")}
    unet = UNet(UNetConfig(in_channels=in_channels, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                           attention_levels=(1,), head_channels=16, norm_groups=8, context_dim=32, pooled_context_dim=32))
    return DiffusionPipeline(randomised(unet, 0), NoiseSchedule.scaled_linear(100), "eps", resolution=resolution,
                             conditioner=Conditioner("text", text_encoder=spec))


@pytest.fixture(scope="module")
def latent(sd_dir):
    ae = AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mults=(1, 2, 2), norm_groups=4, scaling_factor=0.5))
    pipe = diffusion_pipeline(sd_dir, 4, 4)
    return pipe, Text2ImagePipeline.from_diffusion_pipeline(pipe, vae=randomised(ae, 1))


def test_latent_pipeline_samples_the_diffusion_model_and_decodes(latent):
    """Same denoiser, guidance, sampler and seeds as DiffusionPipeline; the image is vae.decode(latent / scaling)."""
    pipe, t2i = latent
    out = t2i.in_batches(2, 2, prompt=PROMPTS, negative_prompt="circle", seed=5, output_type="pt", **CALL)
    ref = pipe(num_images=2, seed=5, prompt=PROMPTS, negative_prompt="circle", **CALL)
    assert out.latents.shape == (2, 4, 4, 4) and out.samples.shape == (2, 3, 16, 16)
    # float32, the same denoiser, sampler and seeds as DiffusionPipeline, |x| <= 1 after clamping: seen 0; 1e-6 ~ 8 ulps at 1, for op-order differences.
    torch.testing.assert_close(out.latents.clamp(-1, 1), ref.samples, rtol=0, atol=1e-6)
    with torch.no_grad():
        decoded = t2i.vae.decode(out.latents / 0.5).clamp(-1, 1)
    # float32, the same decoder call on the same latents: seen 0; 1e-6 ~ 8 ulps at |y| <= 1.
    torch.testing.assert_close(out.samples, decoded, rtol=0, atol=1e-6)
    # float32 affine map of the decoded image to [0, 1] (2 roundings): seen 0; 1e-6 ~ 8 ulps at 1.
    torch.testing.assert_close(out.images, (decoded + 1) / 2, rtol=0, atol=1e-6)


def test_image_i_depends_only_on_seed_i(latent):
    _, t2i = latent
    one_by_one = t2i.in_batches(3, 1, prompt="a red circle", seed=2, **CALL)
    together = t2i.in_batches(3, 3, prompt="a red circle", seed=2, **CALL)
    # float32, batch of 3 vs 3 batches of 1 (GEMM blocking changes inside denoiser and decoder): seen 1.0e-7; 1e-5 = 96x.
    torch.testing.assert_close(one_by_one.samples, together.samples, rtol=0, atol=1e-5)
    assert len(together.images) == 3 and together.images[0].size == (16, 16)


def test_sampler_swap_by_name_and_function(latent):
    from difflab.samplers import get_sampler

    _, t2i = latent
    def seeded():
        return torch.Generator().manual_seed(0)

    by_name = t2i("a red circle", generator=seeded(), **{**CALL, "sampler": "dpmpp_2m"})
    by_fn = t2i("a red circle", generator=seeded(), **{**CALL, "sampler": get_sampler("dpmpp_2m")})
    ddim = t2i("a red circle", generator=seeded(), **CALL)
    assert torch.equal(by_name.samples, by_fn.samples) and not torch.equal(by_name.samples, ddim.samples)


def test_eta_zero_is_ignored_by_deterministic_samplers(latent):
    """diffusers' canonical call passes eta=0.0 whatever the scheduler: a sampler without eta ignores it."""
    pipe, t2i = latent
    call = {**CALL, "sampler": "dpmpp_2m"}
    plain = t2i("a red circle", generator=torch.Generator().manual_seed(0), **call)
    with_eta = t2i("a red circle", eta=0.0, generator=torch.Generator().manual_seed(0), **call)
    assert torch.equal(plain.samples, with_eta.samples)
    assert torch.equal(pipe(seed=3, prompt="circle", **call).samples, pipe(seed=3, prompt="circle", eta=0, **call).samples)
    # ddim with eta=1 is stochastic: eta still reaches the samplers that take it.
    ddim = [t2i("circle", eta=eta, generator=torch.Generator().manual_seed(0), **CALL).samples for eta in (0.0, 1.0)]
    assert not torch.equal(*ddim)
    for run in (lambda: t2i("a red circle", eta=0.5, **call), lambda: pipe(prompt="circle", eta=0.5, **call)):
        with pytest.raises(UserError, match="eta=0.5 .* 'dpmpp_2m' has no eta option; use one of ddim, dpmpp_2m_sde"):
            run()


def assert_round_trip(t2i, path, weights=("unet", "vae")):
    before = t2i.in_batches(2, 2, prompt=PROMPTS, seed=3, **CALL)
    t2i.save_pretrained(path)
    for name in weights:
        assert (path / name / "config.json").is_file() and (path / name / "model.safetensors").is_file()
    for name in ("text_encoder", "tokenizer", "scheduler"):
        assert (path / name).is_dir()
    after = Text2ImagePipeline.from_pretrained(path).in_batches(2, 2, prompt=PROMPTS, seed=3, **CALL)
    assert torch.equal(before.samples, after.samples)


def test_latent_round_trip(latent, tmp_path):
    assert_round_trip(latent[1], tmp_path / "t2i")


def test_pixel_round_trip_and_cli(sd_dir, tmp_path):
    t2i = Text2ImagePipeline.from_diffusion_pipeline(diffusion_pipeline(sd_dir, 3, 8))
    assert_round_trip(t2i, tmp_path / "pixel", weights=("unet",))
    main(["sample", "--model", str(tmp_path / "pixel"), "--prompt", "circle", "--steps", "3", "--num-images", "2",
          "--out", str(tmp_path / "grid.png"), "--no-progress"])
    assert Image.open(tmp_path / "grid.png").size == (2 * 8 + 3 * 2, 8 + 2 * 2)


def test_cli_on_a_stable_diffusion_folder_matches_the_python_api(sd_dir, tmp_path):
    main(["sample", "--model", str(sd_dir), "--prompt", "a red circle", "--negative-prompt", "blue", "--steps", "3",
          "--num-images", "3", "--batch-size", "2", "--seed", "4", "--height", "16", "--width", "24",
          "--out", str(tmp_path / "sd.png"), "--no-progress"])
    pipe = Text2ImagePipeline.from_pretrained(sd_dir)
    out = pipe.in_batches(3, 3, prompt="a red circle", negative_prompt="blue", seed=4, height=16, width=24,
                          num_inference_steps=3, progress=False)
    assert out.samples.shape == (3, 3, 16, 24)
    expected = np.asarray(to_pil_grid(out.samples, nrow=2)).astype(int)
    assert np.abs(np.asarray(Image.open(tmp_path / "sd.png")).astype(int) - expected).max() <= 1


@pytest.mark.parametrize("args,match", [
    (["--prompt", "x", "--height", "30"], "height 24 or 32"),
    ([], "needs --prompt"),
    (["--prompt", "x", "--class-label", "1"], "--class-label and --classifier"),
    (["--prompt", "x", "--dtype", "float16"], "float16 needs a GPU"),
])
def test_cli_errors_on_text2image_folders(sd_dir, tmp_path, capsys, args, match):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--model", str(sd_dir), "--steps", "2", "--num-images", "1", "--out", str(tmp_path / "g.png"),
              "--no-progress", *args])
    assert exit_info.value.code == 2 and match in capsys.readouterr().err


def test_height_on_a_difflab_model_folder_is_an_error(latent, tmp_path, capsys):
    latent[0].save_pretrained(tmp_path / "model")
    with pytest.raises(SystemExit):
        main(["sample", "--model", str(tmp_path / "model"), "--prompt", "x", "--height", "16", "--out", str(tmp_path / "g.png")])
    assert "--height, --width and --dtype apply to text-to-image folders" in capsys.readouterr().err


def test_bad_inputs(latent, sd_dir):
    _, t2i = latent
    with pytest.raises(UserError, match="height 12 or 16 and width 16"):
        t2i("x", height=14, width=16, **CALL)
    with pytest.raises(UserError, match="num_images_per_prompt"):
        t2i("x", num_images_per_prompt=0, **CALL)
    with pytest.raises(UserError, match="2 negative prompts for 1 prompts"):
        t2i("x", negative_prompt=["a", "b"], **CALL)
    with pytest.raises(UserError, match="output_type"):
        t2i("x", output_type="np", **CALL)
    with pytest.raises(UserError, match="conditioned on 'none', not text"):
        Text2ImagePipeline.from_diffusion_pipeline(DiffusionPipeline(latent[0].unet, NoiseSchedule.linear(10), resolution=4))
    with pytest.raises(UserError, match="UNet takes 3 channels"):
        Text2ImagePipeline.from_diffusion_pipeline(diffusion_pipeline(sd_dir, 3, 4), vae=t2i.vae)
