"""Trainer: it learns, resumes exactly, survives interrupts and never overwrites a run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config_dict
from difflab.errors import UserError
from difflab.pipelines.diffusion import DiffusionPipeline
from difflab.recipes import train
from difflab.recipes.diffusion import build_diffusion_training
from difflab.training import TrainConfig, Trainer, TrainingInterrupted
from difflab.training import checkpoint as ckpt


def weights(out):
    path = ckpt.find_checkpoint(out)
    return load_file(str(path / "model.safetensors")), load_file(str(path / "ema.safetensors"))


def assert_same_weights(a, b):
    for wa, wb in zip(a, b):
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted 6-step run that the resume tests compare against."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(TrainConfig.from_dict(tiny_config_dict()), out, progress=False)
    return out


def test_train_exports_a_pipeline(straight_run):
    pipe = DiffusionPipeline.from_pretrained(straight_run)
    out = pipe(num_images=2, num_inference_steps=3, seed=0, progress=False)
    assert len(out.images) == 2 and out.images[0].size == (16, 16) and out.nfe == 3
    lines = (straight_run / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_loss_decreases_on_shapes(tmp_path):
    cfg = TrainConfig.from_dict(tiny_config_dict(steps=60, batch_size=16))
    cfg.log.checkpoint_every = 0
    train(cfg, tmp_path / "run", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10


def test_resume_is_bitwise_exact(tmp_path, tiny_config, straight_run):
    half = TrainConfig.from_dict(tiny_config_dict(steps=3))
    train(half, tmp_path / "resumed", progress=False)
    train(tiny_config, tmp_path / "resumed", resume=True, progress=False)
    assert_same_weights(weights(straight_run), weights(tmp_path / "resumed"))


def test_interrupt_saves_and_resume_matches(tmp_path, tiny_config, monkeypatch, straight_run):
    original = Trainer.train_step

    def interrupted(self, step):
        if step == 4:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(TrainingInterrupted, match="step 4"):
        train(tiny_config, tmp_path / "run", progress=False)
    monkeypatch.setattr(Trainer, "train_step", original)
    assert json.loads((ckpt.find_checkpoint(tmp_path / "run") / "state.json").read_text())["step"] == 4
    train(tiny_config, tmp_path / "run", resume=True, progress=False)
    assert_same_weights(weights(straight_run), weights(tmp_path / "run"))


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, tiny_config, monkeypatch):
    trainer = build_diffusion_training(tiny_config, tmp_path)
    trainer.train_step(0)
    trainer.step = 1
    trainer.save()
    before = load_file(str(ckpt.find_checkpoint(tmp_path) / "model.safetensors"))
    calls = {"n": 0}
    real = ckpt.save_file

    def failing(tensors, path, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(tensors, path, **kw)

    monkeypatch.setattr(ckpt, "save_file", failing)
    trainer.train_step(1)
    trainer.step = 2
    with pytest.raises(OSError):
        trainer.save()
    after = load_file(str(ckpt.find_checkpoint(tmp_path) / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000001"]


def test_nan_loss_stops_with_clear_error(tmp_path, tiny_config, monkeypatch):
    import difflab.training.objectives.diffusion as tr

    real = tr.diffusion_loss
    monkeypatch.setattr(tr, "diffusion_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(UserError, match="NaN/Inf for 3 steps in a row.*lower optim.lr"):
        train(tiny_config, tmp_path / "run", progress=False)


def test_refuses_to_overwrite_or_resume_wrongly(tmp_path, tiny_config, straight_run):
    with pytest.raises(UserError, match="already holds a training run"):
        train(tiny_config, straight_run, progress=False)
    other = TrainConfig.from_dict({**tiny_config_dict(), "model": {**tiny_config_dict()["model"], "base_channels": 8}})
    with pytest.raises(UserError, match="model.base_channels"):
        train(other, straight_run, resume=True, progress=False)


def test_resume_without_checkpoint_starts_from_step_zero(tmp_path, tiny_config, straight_run, monkeypatch):
    """A run killed before its first checkpoint, restarted with the same command line (diffusers'
    ``--resume_from_checkpoint latest`` convention): a notice, then the same run as an uninterrupted one."""
    original = Trainer.train_step

    def killed(self, step):
        if step == 1:
            raise SystemExit(137)  # dies without a checkpoint (no KeyboardInterrupt handler runs)
        return original(self, step)

    monkeypatch.setattr(Trainer, "train_step", killed)
    with pytest.raises(SystemExit):
        train(tiny_config, tmp_path / "run", progress=False)
    monkeypatch.setattr(Trainer, "train_step", original)
    assert ckpt.find_checkpoint(tmp_path / "run") is None and (tmp_path / "run" / "run_settings.json").is_file()
    other = TrainConfig.from_dict({**tiny_config_dict(), "model": {**tiny_config_dict()["model"], "base_channels": 8}})
    with pytest.raises(UserError, match="cannot resume .*model.base_channels differ"):
        train(other, tmp_path / "run", resume=True, progress=False)
    with pytest.warns(UserWarning, match="no checkpoint in .* starting the run from step 0"):
        train(tiny_config, tmp_path / "run", resume=True, progress=False)
    assert_same_weights(weights(straight_run), weights(tmp_path / "run"))
    with pytest.warns(UserWarning, match="starting the run from step 0"):  # a fresh folder: a new run
        assert train(tiny_config, tmp_path / "new", resume=True, progress=False).step == tiny_config.optim.steps


def test_resume_of_a_run_without_run_settings_checks_its_checkpoint_config(tmp_path, tiny_config, straight_run):
    """Runs started before OUT/run_settings.json existed are checked against their checkpoint's config."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(straight_run, old)
    (old / "run_settings.json").unlink()
    other = TrainConfig.from_dict({**tiny_config_dict(), "model": {**tiny_config_dict()["model"], "base_channels": 8}})
    with pytest.raises(UserError, match="cannot resume .*model.base_channels differ"):
        train(other, old, resume=True, progress=False)
    assert "complete at step" in train(tiny_config, old, resume=True, progress=False).note


def test_resume_of_a_finished_run_changes_nothing(tiny_config, straight_run):
    before = {p: p.stat().st_mtime_ns for p in straight_run.rglob("*") if p.is_file()}
    result = train(tiny_config, straight_run, resume=True, progress=False)
    assert result.note is not None and f"complete at step {tiny_config.optim.steps}" in result.note
    assert {p: p.stat().st_mtime_ns for p in straight_run.rglob("*") if p.is_file()} == before


def test_previews_are_written_by_the_modality(tmp_path):
    """log.sample_every writes OUT/samples/step_N.png: a grid of num_samples images of the trained size."""
    from PIL import Image

    config = TrainConfig.from_dict(tiny_config_dict())
    config.log.sample_every, config.optim.steps = 3, 3
    train(config, tmp_path / "run", progress=False)
    grid = Image.open(tmp_path / "run" / "samples" / "step_0000003.png")
    assert grid.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 4 images of 16x16 in a 2x2 grid with 2-pixel frames


def test_config_validation():
    with pytest.raises(UserError, match="unknown config key optim.stepz"):
        TrainConfig.from_dict({"optim": {"stepz": 3}})
    with pytest.raises(UserError, match="optim.steps=-1"):
        TrainConfig.from_dict({"optim": {"steps": -1}})
    with pytest.raises(UserError, match="must be a int"):
        TrainConfig.from_dict({"optim": {"steps": "many"}})
    with pytest.raises(UserError, match="objective.parameterization"):
        TrainConfig.from_dict({"objective": {"parameterization": "score"}})



@pytest.mark.parametrize("loss, learn_variance, weighting", [("simple", False, "min_snr"), ("hybrid", True, "min_snr"),
                                                             ("vlb", False, "uniform"), ("vlb", True, "uniform")])
def test_the_default_weighting_is_min_snr_except_for_the_vlb(loss, learn_variance, weighting):
    """weighting "auto" (issue 12's recipe): min-SNR on a regression loss; the VLB has its own weights, so uniform."""
    config = TrainConfig.from_dict({"objective": {"loss": loss, "learn_variance": learn_variance}})
    assert config.objective.weighting == weighting
    with pytest.raises(UserError, match="weighting 'min_snr' .* loss 'vlb'"):
        TrainConfig.from_dict({"objective": {"loss": "vlb", "weighting": "min_snr"}})


def test_default_layout_is_the_measured_one_for_32px_images_only():
    """A config that names no layout gets the patch32 preset at 32x32 (token pooling with text), nothing elsewhere;
    one layout key hands the whole layout back to the user (UNetConfig's field defaults plus that key)."""
    from difflab.nets.unet_config import PRESETS, UNetConfig
    from difflab.recipes.diffusion import build_network

    given = {"in_channels": 3, "sample_shape": [3, 32, 32]}
    net = build_network({}, given)
    assert {k: getattr(net.config, k) for k in PRESETS["patch32"]} == PRESETS["patch32"] and not net.config.token_pooling
    assert build_network({}, {**given, "context_dim": 16}).config.token_pooling
    plain = UNetConfig()
    own = build_network({"base_channels": 16, "norm_groups": 8}, given).config
    assert (own.patch_size, own.coordinate_channels, own.num_res_blocks) == (1, False, plain.num_res_blocks)
    other = build_network({}, {"in_channels": 3, "sample_shape": [3, 16, 16]}).config
    assert (other.patch_size, other.base_channels, other.coordinate_channels) == (1, plain.base_channels, False)
    sized = build_network({"coordinate_channels": False}, given).config  # a non-layout key keeps the layout
    assert sized.patch_size == 2 and not sized.coordinate_channels


@pytest.mark.parametrize("objective", [
    {"parameterization": "x0", "weighting": "min_snr"},
    {"parameterization": "v", "weighting": "min_snr", "min_snr_gamma": 1.0},
    {"parameterization": "edm", "timestep_sampling": "lognormal"},
])
def test_every_objective_trains_saves_and_samples(tmp_path, objective):
    cfg = TrainConfig.from_dict({**tiny_config_dict(steps=4), "objective": objective})
    train(cfg, tmp_path / "run", progress=False)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "run")
    assert pipe.parameterization == objective["parameterization"]
    out = pipe(num_images=2, num_inference_steps=3, seed=0, progress=False, sampler="dpmpp_2m")
    assert torch.isfinite(out.samples).all()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(map(lambda v: v == v, losses))


def test_lognormal_needs_the_simple_loss():
    with pytest.raises(UserError, match="lognormal.*use loss simple"):
        TrainConfig.from_dict({"objective": {"timestep_sampling": "lognormal", "loss": "vlb"}})


def test_gradient_accumulation_equals_the_whole_batch(tmp_path):
    """4 micro-batches of 1 give the gradient of the mean over the batch of 4: after 3 AdamW steps the weights
    agree with the plain run up to float summation order (1e-4 = a tenth of one step's update at lr 1e-3),
    and bf16 autocast on CPU trains too."""
    plain = TrainConfig.from_dict(tiny_config_dict(steps=3))
    accum = TrainConfig.from_dict(tiny_config_dict(steps=3, grad_accum_steps=4))
    train(plain, tmp_path / "plain", progress=False)
    train(accum, tmp_path / "accum", progress=False)
    (a, _), (b, _) = weights(tmp_path / "plain"), weights(tmp_path / "accum")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    bf16 = TrainConfig.from_dict(tiny_config_dict(steps=3, mixed_precision="bf16"))
    train(bf16, tmp_path / "bf16", progress=False)
    (c, _) = weights(tmp_path / "bf16")
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 0  # autocast really changed the arithmetic
    # Same data, seeds and init: each step's logged loss matches the fp32 run's. The output conv starts at
    # zero, so the loss is ~mean(eps^2) and bf16 (2^-8 relative) errors enter only through the small
    # prediction and the few-1e-3 weight drift Adam sign flips cause; seen <= 4.2e-6 relative, 1e-4 is 24x that.
    loss = lambda run: [json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert len(loss("bf16")) == 3
    for got, want in zip(loss("bf16"), loss("plain")):
        assert got == pytest.approx(want, rel=1e-4)


def test_bf16_autocast_loss_and_gradient_match_fp32():
    """The tiny UNet's eps loss and its gradient under CPU bf16 autocast (what Accelerate applies) against fp32."""
    from difflab.losses import diffusion_loss
    from difflab.nets.unet import UNet, UNetConfig
    from difflab.schedules import NoiseSchedule

    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=3, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,),
                          head_channels=16, norm_groups=8))
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)  # a non-zero prediction, so bf16 reaches the loss
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t, sched = torch.tensor([5, 30, 60, 95]), NoiseSchedule.linear(100)

    def run(autocast: bool):
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            value = diffusion_loss(net, x0, sched, t, noise).mean()
        value.backward()
        return value.detach().float(), torch.cat([p.grad.flatten() for p in net.parameters()])

    (l32, g32), (l16, g16) = run(False), run(True)
    grad_err = ((g16 - g32).norm() / g32.norm()).item()
    # bf16 keeps 8 significand bits (relative eps 2^-8 = 3.9e-3). The prediction passes ~12 autocast
    # convolutions / matmuls, each rounding its inputs to bf16, so the prediction and the backward pass carry
    # ~sqrt(12) * 2^-8 ~ 1.3e-2 relative error (gradient seen 1.4e-2); 5e-2 bounds it with 3.5x margin, and
    # > 1e-4 (fp32 would give ~1e-7) shows autocast really ran in bf16.
    assert 1e-4 < grad_err < 5e-2, grad_err
    # The loss, a mean over 3072 squared entries, averages those errors down: seen 2.4e-4 relative; 2e-3 = 8x.
    assert l16.item() == pytest.approx(l32.item(), rel=2e-3)
    assert l16.item() != l32.item()


def test_channels_last_training_keeps_its_format_and_resumes_exactly(tmp_path):
    """optim.channels_last: the 4-D weights and the image batch in channels-last memory; a saved checkpoint
    (contiguous safetensors) resumes bit-exactly, and the run's loss equals the contiguous run's to rounding
    (convolutions in another memory order may sum in another order: seen equal; 1e-5 relative allowed)."""
    def config(steps):
        raw = tiny_config_dict(steps=steps)
        raw["optim"]["channels_last"] = True
        return TrainConfig.from_dict(raw)

    trainer = build_diffusion_training(config(6), tmp_path / "probe", progress=False)
    conv = next(p for p in trainer.model.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert trainer._local_batch(0)["x"].is_contiguous(memory_format=torch.channels_last)
    train(config(6), tmp_path / "straight", progress=False)
    train(config(3), tmp_path / "resumed", progress=False)
    train(config(6), tmp_path / "resumed", resume=True, progress=False)
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))
    plain = build_diffusion_training(TrainConfig.from_dict(tiny_config_dict(steps=6)), tmp_path / "plain", progress=False)
    a, b = trainer.train_step(0), plain.train_step(0)
    assert abs(a - b) <= 1e-5 * abs(b)
