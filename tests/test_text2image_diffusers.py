"""difflab's Text2ImagePipeline on a Stable-Diffusion-format folder against diffusers' StableDiffusionPipeline.

The folder is a tiny randomly initialised SD model (tests/sd_tiny.py). Both pipelines get the same
initial latents (or the same generator), prompt, negative prompt, guidance scale and number of steps;
diffusers samples with its DDIMScheduler / DPMSolverMultistepScheduler, difflab with its own ddim /
dpmpp_2m samplers through the shared denoiser and classifier-free guidance.

Tolerance: images in [0, 1] agree to ATOL = 1e-5 (1/400 of an 8-bit level). The networks are the same
modules on the same inputs; what differs is float32 arithmetic: diffusers keeps its alpha_bar table in
float32 (a cumulative product of 1000 float32 factors, relative error up to ~1e-6) where difflab uses
float64, the two libraries order the guided batch differently ([uncond, cond] vs [cond, uncond]) and
compute the update with differently grouped operations. The measured gap is ~1e-6; ATOL leaves a
10x margin and is 90x below the smallest real change tested here (DDIM's final-step alpha, ~1e-3).
DDIMScheduler steps from t to t - T // N whatever its spacing, off its own grid when N does not divide T
(trailing) or for linspace spacing; difflab steps between grid points, so those cases are not compared.
"""

import json
import shutil
import sys
import warnings

import pytest
import torch
from sd_tiny import SD_SCHEDULER, build_sd_folder

from difflab.errors import UserError
from difflab.interop.diffusers_config import SchedulerSpec, diffusers_grid
from difflab.schedules import NoiseSchedule

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]
ATOL = 1e-5
PROMPT = ["a red circle", "circle"]
CALL = {"height": 32, "width": 32, "num_inference_steps": 5, "guidance_scale": 7.5, "output_type": "pt"}  # 5 divides T (see docs)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return build_sd_folder(tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture(scope="module")
def peer(sd_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(sd_dir):
    from difflab.pipelines.text2image import Text2ImagePipeline

    return Text2ImagePipeline.from_pretrained(sd_dir)


def with_scheduler(peer, ours, cls_name, **overrides):
    """Give diffusers the scheduler class with SD's config plus ``overrides``, and difflab the same config."""
    import diffusers

    config = {**SD_SCHEDULER, **overrides}
    peer.scheduler = getattr(diffusers, cls_name).from_config(config)
    ours.scheduler = SchedulerSpec.from_diffusers({**peer.scheduler.config, "_class_name": cls_name})


def latents(seed=0):
    return torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(seed))


CASES = [  # (difflab sampler, diffusers scheduler, config overrides)
    ("ddim", "DDIMScheduler", {}),  # Stable Diffusion's config: leading + offset 1, final alpha = alpha_bar_0
    ("ddim", "DDIMScheduler", {"timestep_spacing": "trailing", "set_alpha_to_one": True}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"timestep_spacing": "linspace", "final_sigmas_type": "sigma_min"}),
]


@pytest.mark.parametrize("sampler,scheduler,overrides", CASES)
def test_same_image_as_diffusers(peer, ours, sampler, scheduler, overrides):
    with_scheduler(peer, ours, scheduler, **overrides)
    theirs = peer(PROMPT, negative_prompt=["blue", ""], latents=latents(), **CALL).images
    mine = ours(PROMPT, negative_prompt=["blue", ""], latents=latents(), sampler=sampler, progress=False, **CALL)
    assert mine.images.shape == theirs.shape == (2, 3, 32, 32)
    torch.testing.assert_close(mine.images, theirs, rtol=0, atol=ATOL)
    assert mine.nfe == 5


def test_stochastic_ddim_draws_the_same_noise(peer, ours):
    """One generator: the initial latents and every DDIM eta = 1 step's noise come from it in the same order."""
    with_scheduler(peer, ours, "DDIMScheduler")
    theirs = peer("a red circle", eta=1.0, generator=torch.Generator().manual_seed(3), num_images_per_prompt=2, **CALL).images
    mine = ours("a red circle", eta=1.0, sampler="ddim", generator=torch.Generator().manual_seed(3),
                num_images_per_prompt=2, progress=False, **CALL)
    torch.testing.assert_close(mine.images, theirs, rtol=0, atol=ATOL)


def test_tolerance_separates_real_differences(ours):
    """The final-step alpha of SD's DDIM config (alpha_bar_0, not 1) moves the image by far more than ATOL."""
    ours.scheduler = SchedulerSpec.from_diffusers({**SD_SCHEDULER, "_class_name": "DDIMScheduler"})
    stop = ours(PROMPT, latents=latents(), sampler="ddim", progress=False, **CALL).images
    ours.scheduler = SchedulerSpec.from_diffusers({**SD_SCHEDULER, "set_alpha_to_one": True, "_class_name": "DDIMScheduler"})
    clean = ours(PROMPT, latents=latents(), sampler="ddim", progress=False, **CALL).images
    assert (stop - clean).abs().max() > 50 * ATOL


def test_round_trip_and_diffusers_reads_what_difflab_writes(ours, sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from difflab.pipelines.text2image import Text2ImagePipeline

    ours.scheduler = SchedulerSpec.from_diffusers(json.loads((sd_dir / "scheduler" / "scheduler_config.json").read_text()))
    before = ours(PROMPT, latents=latents(1), progress=False, **CALL)
    ours.save_pretrained(tmp_path / "copy")
    for name in ("unet", "vae", "text_encoder"):
        assert (tmp_path / "copy" / name / "config.json").is_file()
        assert list((tmp_path / "copy" / name).glob("*.safetensors"))
    assert (tmp_path / "copy" / "scheduler" / "scheduler_config.json").is_file()
    after = Text2ImagePipeline.from_pretrained(tmp_path / "copy")(PROMPT, latents=latents(1), progress=False, **CALL)
    assert torch.equal(before.images, after.images)
    peer = StableDiffusionPipeline.from_pretrained(str(tmp_path / "copy"), safety_checker=None)
    peer.set_progress_bar_config(disable=True)
    torch.testing.assert_close(ours(PROMPT, latents=latents(1), sampler="ddim", progress=False, **CALL).images,
                               peer(PROMPT, latents=latents(1), **CALL).images, rtol=0, atol=ATOL)


def test_bfloat16_on_cpu_runs_close_to_float32(sd_dir, ours):
    """bf16 keeps 8 mantissa bits (relative error 2^-9 per rounding): the image stays within a few 8-bit levels."""
    from difflab.pipelines.text2image import Text2ImagePipeline

    ours.scheduler = SchedulerSpec.from_diffusers({**SD_SCHEDULER, "_class_name": "DDIMScheduler"})
    low = Text2ImagePipeline.from_pretrained(sd_dir, torch_dtype=torch.bfloat16)
    assert low.unet.unet.dtype == torch.bfloat16 and low.text_encoder.dtype == torch.bfloat16
    a = low(PROMPT, latents=latents(), sampler="ddim", progress=False, **CALL)
    b = ours(PROMPT, latents=latents(), sampler="ddim", progress=False, **CALL)
    assert a.images.dtype == torch.float32 and a.latents.dtype == torch.float32
    assert 0 < (a.images - b.images).abs().max() < 8 / 255


# ----- schedule and grid mapping -----------------------------------------------------------------
def test_scaled_linear_betas():
    """beta = linspace(sqrt(0.00085), sqrt(0.012), T)^2 (Rombach et al. 2022), and diffusers' float32 table."""
    from diffusers import DDIMScheduler

    ours = NoiseSchedule.scaled_linear(1000).betas
    exact = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    # float64 linspace then square (2 roundings): seen 7.2e-16 rel; 1e-14 = 14x.
    torch.testing.assert_close(ours, exact, rtol=1e-14, atol=0)
    # diffusers' table is float32 (linspace + square, ~3 roundings of eps 1.19e-7): seen 2.3e-7 rel; 1e-6 = 4.4x.
    torch.testing.assert_close(ours.float(), DDIMScheduler(**SD_SCHEDULER).betas, rtol=1e-6, atol=0)
    small = NoiseSchedule.scaled_linear(50)
    assert NoiseSchedule.from_config(small.to_config()).betas.equal(small.betas)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("prediction,param", [("epsilon", "eps"), ("v_prediction", "v"), ("sample", "x0")])
def test_schedule_and_parameterization_from_config(kind, prediction, param):
    from diffusers import DDPMScheduler

    config = {"num_train_timesteps": 1000, "beta_schedule": kind, "beta_start": 0.0001, "beta_end": 0.02,
              "prediction_type": prediction}
    spec = SchedulerSpec.from_diffusers(config)
    # diffusers cumprods 1000 float32 factors: worst case ~1000 * eps/2 = 6e-5 rel, seen 1.3e-5; loosened from 2e-5 (1.5x margin) to 6e-5 (4.6x).
    torch.testing.assert_close(spec.schedule.alphas_cumprod.float(), DDPMScheduler(**config).alphas_cumprod, rtol=6e-5, atol=0)
    assert spec.parameterization == param


@pytest.mark.parametrize("cls_name,family", [("DDIMScheduler", "ddim"), ("DPMSolverMultistepScheduler", "dpmpp_2m")])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("offset", [0, 1])
def test_grids_match_set_timesteps(cls_name, family, spacing, offset):
    import diffusers

    schedule = NoiseSchedule.scaled_linear(1000)
    peer = getattr(diffusers, cls_name).from_config({**SD_SCHEDULER, "timestep_spacing": spacing, "steps_offset": offset})
    for steps in (1, 4, 7, 10, 25, 50, 333):
        peer.set_timesteps(steps)
        grid = diffusers_grid(schedule, steps, spacing, offset, "ddim" if family == "ddim" else "multistep")
        assert grid[:-1].tolist() == peer.timesteps.tolist() and grid[-1] == -1


def test_final_step_rules():
    sd = SchedulerSpec.from_diffusers(dict(SD_SCHEDULER))
    assert (sd.end_time("ddim"), sd.end_time("ddpm"), sd.end_time("dpmpp_2m")) == (0.0, -1.0, -1.0)
    dpm = SchedulerSpec.from_diffusers({**SD_SCHEDULER, "final_sigmas_type": "sigma_min"})
    assert dpm.end_time("dpmpp_2m") == 0.0
    assert SchedulerSpec(NoiseSchedule.linear(100)).timesteps(10, "ddim") is None  # difflab's own default grid


@pytest.mark.parametrize("config,match", [
    ({"beta_schedule": "sigmoid"}, "beta_schedule 'sigmoid'"),
    ({"prediction_type": "flow"}, "prediction_type 'flow'"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ({"timestep_spacing": "karras"}, "timestep_spacing 'karras'"),
])
def test_unsupported_scheduler_options(config, match):
    with pytest.raises(UserError, match=match):
        SchedulerSpec.from_diffusers({**SD_SCHEDULER, **config})


def test_solver_only_options_warn():
    with pytest.warns(UserWarning, match="clip_sample"):
        SchedulerSpec.from_diffusers({**SD_SCHEDULER, "clip_sample": True})


# ----- bad input ---------------------------------------------------------------------------------
def test_size_not_divisible_names_nearest_sizes(ours):
    with pytest.raises(UserError, match="height 24 or 32 and width 32"):
        ours("a red circle", height=30, width=32, progress=False)


def test_latents_of_wrong_shape(ours):
    with pytest.raises(UserError, match=r"expected \(1, 4, 4, 4\)"):
        ours("a red circle", height=32, width=32, latents=torch.randn(1, 4, 8, 8), progress=False)


def test_float16_on_cpu_is_an_error(sd_dir):
    from difflab.pipelines.text2image import Text2ImagePipeline

    with pytest.raises(UserError, match="float16 needs a GPU"):
        Text2ImagePipeline.from_pretrained(sd_dir, torch_dtype=torch.float16, device="cpu")


def broken_copy(sd_dir, tmp_path, edit=None, remove=None):
    copy = shutil.copytree(sd_dir, tmp_path / "broken")
    if remove:
        shutil.rmtree(copy / remove)
    if edit:
        index = json.loads((copy / "model_index.json").read_text())
        index.update(edit)
        (copy / "model_index.json").write_text(json.dumps(index))
    return copy


@pytest.mark.parametrize("edit,remove,match", [
    (None, "vae", "the vae component is missing"),
    ({"text_encoder": [None, None]}, None, "has no text_encoder component"),
    ({"unet": ["diffusers", "UNet2DModel"]}, None, "unet class diffusers.UNet2DModel is not supported"),
    ({"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}, None, "FlowMatchEulerDiscreteScheduler is not supported"),
    ({"text_encoder": ["transformers", "T5EncoderModel"]}, None, "transformers.T5EncoderModel is not supported"),
    ({"_class_name": "StableDiffusionXLPipeline"}, None, "StableDiffusionXLPipeline"),
])
def test_bad_folders(sd_dir, tmp_path, edit, remove, match):
    from difflab.pipelines.text2image import Text2ImagePipeline

    with pytest.raises(UserError, match=match):
        Text2ImagePipeline.from_pretrained(broken_copy(sd_dir, tmp_path, edit, remove))


def test_without_diffusers_the_error_says_how_to_install(sd_dir, monkeypatch):
    from difflab.pipelines.text2image import Text2ImagePipeline

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with warnings.catch_warnings(), pytest.raises(UserError, match=r"pip install 'difflab\[diffusers\]'"):
        Text2ImagePipeline.from_pretrained(sd_dir)
