"""The classifier and autoencoder objectives on the one Trainer: exact resume, the NaN guard, one-backward GAN."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from difflab.data import build_dataset
from difflab.data.base import ArrayDataset
from difflab.data.digits import DigitsDataset
from difflab.nets.autoencoder import AutoencoderConfig, AutoencoderKL
from difflab.nets.classifier import ClassifierConfig, NoisyClassifier
from difflab.nets.discriminator import PatchDiscriminator
from difflab.schedules import NoiseSchedule
from difflab.training.autoencoder import train_autoencoder
from difflab.training.autoencoder_loss import hinge_d_loss
from difflab.training.checkpoint import find_checkpoint, load_checkpoint
from difflab.training.classifier import train_classifier
from difflab.training.objectives.autoencoder import AutoencoderObjective, AutoencoderWithDiscriminator
from difflab.training.objectives.noisy_classifier import NoisyClassifierObjective
from difflab.training.runs import run_accelerator, run_config
from difflab.training.trainer import Trainer

SCHED = NoiseSchedule.cosine(50)
CLF = {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_levels": [], "norm_groups": 4,
       "head_channels": 8, "mid_attention": False}
AE = {"base_channels": 8, "norm_groups": 4, "latent_channels": 2}


@pytest.fixture(scope="module")
def digits() -> ArrayDataset:
    full = DigitsDataset(resolution=8)
    return ArrayDataset(full.pixels.permute(0, 2, 3, 1).numpy()[:40], full.labels[:40], full.class_names)


@pytest.fixture(scope="module")
def shapes():
    return build_dataset("shapes", 16, num_images=12, seed=0)


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_checkpoint(find_checkpoint(folder))[0]["model"]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


# ----- exact resume: N steps in one go == N/2 steps, then --resume for the rest (bitwise) --------------------
def test_classifier_resume_is_exact(tmp_path, digits, one_thread) -> None:
    kw = {"batch_size": 16, "lr": 1e-3, "seed": 1, "model": CLF, "progress": False, "device": "cpu"}  # epochs end mid-run
    whole = train_classifier(digits, SCHED, tmp_path / "whole", steps=6, **kw)
    half = train_classifier(digits, SCHED, tmp_path / "split", steps=3, **kw)
    rest = train_classifier(digits, SCHED, tmp_path / "split", steps=6, resume=True, **kw)
    assert (half.step, rest.step, whole.step) == (3, 6, 6) and rest.note is None
    _assert_same(_weights(tmp_path / "whole"), _weights(tmp_path / "split"))
    _assert_same(load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "split" / "model.safetensors")))
    done = train_classifier(digits, SCHED, tmp_path / "split", steps=6, resume=True, **kw)
    assert done.step == 6 and "complete" in done.note


def test_autoencoder_resume_is_exact_across_the_gan_start(tmp_path, shapes, one_thread) -> None:
    kw = {"config": AE, "batch_size": 4, "lr": 1e-3, "gan_start": 2, "scale_images": 8, "progress": False, "device": "cpu"}
    train_autoencoder(shapes, tmp_path / "whole", steps=4, **kw)
    train_autoencoder(shapes, tmp_path / "split", steps=2, **kw)  # stops before the GAN starts
    again = train_autoencoder(shapes, tmp_path / "split", steps=4, resume=True, **kw)
    whole = _weights(tmp_path / "whole")
    _assert_same(whole, _weights(tmp_path / "split"))
    assert any(k.startswith("discriminator.") for k in whole)
    exported = load_file(str(tmp_path / "split" / "model.safetensors"))
    _assert_same(exported, {k[len("autoencoder."):]: v for k, v in whole.items() if k.startswith("autoencoder.")})
    assert again.scaling_factor == AutoencoderKL.from_pretrained(tmp_path / "whole").scaling_factor != 1.0


def test_autoencoder_time_limit_stops_early_and_still_saves(tmp_path, shapes, one_thread, monkeypatch) -> None:
    import itertools

    import difflab.training.trainer as trainer_module

    clock = itertools.count()  # the trainer's clock advances 1 s per reading: 2 readings per step after the first
    monkeypatch.setattr(trainer_module, "_now", lambda: float(next(clock)))
    kw = {"config": AE, "batch_size": 4, "scale_images": 8, "progress": False}
    early = train_autoencoder(shapes, tmp_path / "run", steps=50, time_limit=2.5, **kw)  # steps start at 0 s and 2 s
    assert early.step == 2 and find_checkpoint(tmp_path / "run").name == "step_0000002"
    assert AutoencoderKL.from_pretrained(tmp_path / "run").scaling_factor == early.scaling_factor
    assert train_autoencoder(shapes, tmp_path / "run", steps=3, resume=True, **kw).step == 3


# ----- the NaN guard ---------------------------------------------------------------------------------------------
class _NaNAt:
    """Wrap an objective so that its loss is NaN at one step."""

    def __init__(self, objective, step: int) -> None:
        self.objective, self.bad = objective, step
        self.name = objective.name

    def __getattr__(self, name):
        return getattr(self.objective, name)

    def prepare(self, batch, generator):
        return {**self.objective.prepare(batch, generator), "step": batch["step"]}

    def loss(self, model, batch):
        losses, terms = self.objective.loss(model, batch)
        return (losses * float("nan") if batch["step"] == self.bad else losses), terms


def _classifier_run(out, steps, digits, nan_at=None):
    torch.manual_seed(0)
    net = NoisyClassifier(ClassifierConfig(in_channels=1, num_classes=10, **CLF))
    objective = NoisyClassifierObjective(SCHED)
    return Trainer(net, digits, objective if nan_at is None else _NaNAt(objective, nan_at),
                   run_config(seed=0, steps=steps, batch_size=8, lr=1e-3), out, progress=False,
                   accelerator=run_accelerator("cpu"))


def _autoencoder_run(out, steps, shapes, nan_at=None):
    torch.manual_seed(0)
    model = AutoencoderWithDiscriminator(AutoencoderKL(AutoencoderConfig(**AE)), PatchDiscriminator(3, 16))
    objective = AutoencoderObjective(kl_weight=1e-6, perceptual_weight=1.0, gan_start=0, disc_weight=0.5,
                                     latent_shape=(2, 4, 4), scale=(shapes, 8, 0))
    return Trainer(model, shapes, objective if nan_at is None else _NaNAt(objective, nan_at),
                   run_config(seed=0, steps=steps, batch_size=4, lr=1e-3, betas=(0.5, 0.9)), out, progress=False,
                   accelerator=run_accelerator("cpu"))


@pytest.mark.parametrize("build", [_classifier_run, _autoencoder_run], ids=["classifier", "autoencoder"])
def test_a_nan_step_is_skipped(build, tmp_path, digits, shapes, one_thread) -> None:
    """A NaN loss at the last step leaves weights and optimizer exactly as after the step before."""
    data = digits if build is _classifier_run else shapes
    bad = build(tmp_path / "bad", 3, data, nan_at=2)
    result = bad.run()
    good = build(tmp_path / "good", 2, data)
    good.run()
    assert bad.skipped_steps == 1 and result.step == 3
    _assert_same(bad.model.state_dict(), good.model.state_dict())
    steps = [s["step"] for s in bad.optimizer.state_dict()["state"].values()]
    assert steps and all(float(s) == 2 for s in steps)


# ----- one backward for generator and discriminator --------------------------------------------------------------
def test_one_backward_gives_each_network_its_own_gradient(shapes) -> None:
    """D's gradient is that of the hinge D loss alone; the autoencoder's that of its own loss alone."""
    torch.manual_seed(0)
    model = AutoencoderWithDiscriminator(AutoencoderKL(AutoencoderConfig(**AE)), PatchDiscriminator(3, 16))
    objective = AutoencoderObjective(kl_weight=1e-3, perceptual_weight=1.0, gan_start=0, disc_weight=0.5,
                                     latent_shape=(2, 4, 4), scale=(shapes, 8, 0))
    batch = objective.prepare({"x": torch.stack([shapes[i]["x"] for i in range(4)]), "step": 0}, torch.Generator().manual_seed(0))
    losses, _ = objective.loss(model, batch)
    losses.mean().backward()
    both = {n: p.grad.clone() for n, p in model.named_parameters()}

    def d_loss() -> torch.Tensor:  # the batch hinge loss of D, from its own implementation
        out = model(batch["x"], batch["eps"], True)
        return hinge_d_loss(out["real"], out["fake"]).mean()

    model.zero_grad(set_to_none=True)
    d_loss().backward()
    for name, p in model.named_parameters():
        if name.startswith("discriminator."):
            # float32 discriminator grads (|g| <= 0.45), the joint loss's D part vs D's own loss: seen 0; rtol 1e-5 ~ 80 eps covers a reordered backward sum.
            torch.testing.assert_close(p.grad, both[name], rtol=1e-5, atol=1e-8)
        else:  # the autoencoder gets nothing from D's loss
            assert p.grad is None or not p.grad.any(), name
    model.zero_grad(set_to_none=True)
    (-model(batch["x"], batch["eps"], True)["fake_for_g"].mean()).backward()  # the generator's GAN term
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if n.startswith("discriminator."))
    assert any(g is not None and g.any() for n, g in grads.items() if n.startswith("autoencoder.decoder."))


# ----- --resume on the command line ------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [
    ["train-classifier", "--dataset", "digits", "--resolution", "8", "--num-images", "32", "--schedule", "cosine",
     "--num-timesteps", "50", "--batch-size", "4"],
    ["train-autoencoder", "--dataset", "shapes", "--resolution", "16", "--num-images", "8", "--batch-size", "2",
     "--base-channels", "8", "--latent-channels", "2"],
], ids=["classifier", "autoencoder"])
def test_cli_resume(command, tmp_path, capsys, one_thread) -> None:
    from conftest import run_cli

    base = [*command, "--out", str(tmp_path / "run"), "--no-progress"]
    code, _, err = run_cli([*base, "--steps", "1"], capsys)
    assert code == 0, err
    code, _, err = run_cli([*base, "--steps", "2"], capsys)
    assert code == 2 and "already holds" in err and "--resume" in err, err
    code, out, err = run_cli([*base, "--steps", "2", "--resume"], capsys)
    assert code == 0 and "trained" in out, err
    assert find_checkpoint(tmp_path / "run").name == "step_0000002"
    code, out, err = run_cli([*base, "--steps", "2", "--resume"], capsys)
    assert code == 0 and "complete at step 2" in out, err
