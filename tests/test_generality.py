"""Issue 11's proof of generality: the one core trains and samples data and networks that are not square images
and not the UNet, through the same Trainer, model folder, pipeline and CLI.

(a) a small MLP denoiser registered here trains on 2-D tabular data from a two-component Gaussian mixture,
    through ``train`` and ``difflab train``; it reloads by ``_class_name`` and samples through the pipeline
    and ``difflab sample``; the samples are checked against the mixture (an independent truth).
(b) a 1-D UNet (``dims=1``) trains a few steps on random waveforms and round-trips through its folder.
(c) a concat-conditioned 2-D UNet trains on (low-res, high-res) pairs with noise-conditioning augmentation
    and samples given a low-res image.
(d) a ragged dataset with masks trains, and its masked loss equals the dense per-sample computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import yaml
from torch import nn

from conftest import run_cli
from difflab.data.base import DiffusionDataset
from difflab.data.collate import make_item, pad_collate
from difflab.data.registry import register_dataset
from difflab.io import JsonConfig, PretrainedModel
from difflab.io.registry import register_network
from difflab.nets.embeddings import timestep_embedding
from difflab.recipes import train
from difflab.training import TrainConfig

MODES = (-2.0, 2.0)  # the mixture's component means (each coordinate), std MODE_STD
MODE_STD = 0.3


@dataclass
class GeneralityMLPConfig(JsonConfig):
    in_channels: int = 2  # filled in from the data's sample_shape
    hidden: int = 64
    time_dim: int = 16


@register_network
class GeneralityMLP(PretrainedModel, nn.Module):
    """eps(x, t) for x of shape (B, D), or pointwise for (B, N, D)."""

    config_class = GeneralityMLPConfig

    def __init__(self, config: GeneralityMLPConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.net = nn.Sequential(nn.Linear(c.in_channels + c.time_dim, c.hidden), nn.SiLU(),
                                 nn.Linear(c.hidden, c.hidden), nn.SiLU(), nn.Linear(c.hidden, c.in_channels))

    def forward(self, x, t, **cond):
        emb = timestep_embedding(t.float(), self.config.time_dim)
        emb = emb.reshape(emb.shape[0], *([1] * (x.ndim - 2)), emb.shape[-1]).expand(*x.shape[:-1], -1)
        return self.net(torch.cat([x, emb.to(x.dtype)], dim=-1))


class MixtureRows(DiffusionDataset):
    """Rows of R^2 from 0.5 N((-2, -2), 0.3^2 I) + 0.5 N((2, 2), 0.3^2 I)."""

    modality = "tensor"

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        sign = torch.randint(0, 2, (n, 1), generator=g) * 2 - 1
        self.rows = sign * 2.0 + MODE_STD * torch.randn(n, 2, generator=g)
        self.sample_shape = (2,)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return make_item(self.rows[i])


class Waves(DiffusionDataset):
    """Random sinusoids (1, 32): the shape of a mono waveform."""

    modality = "tensor"

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        f, phase = torch.rand(n, 1, generator=g) * 4 + 1, torch.rand(n, 1, generator=g) * 6.28
        self.waves = torch.sin(f * torch.linspace(0, 6.28, 32) + phase)[:, None]
        self.sample_shape = (1, 32)

    def __len__(self):
        return len(self.waves)

    def __getitem__(self, i):
        return make_item(self.waves[i])


class RaggedPoints(DiffusionDataset):
    """Point sets of 3 to 6 points in R^3, padded and masked by ``pad_collate``."""

    modality = "tensor"
    sample_shape = (6, 3)  # the longest set
    channels = 3  # features per point (the last axis), what a pointwise network takes

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.sets = [torch.randn(int(torch.randint(3, 7, (1,), generator=g)), 3, generator=g) for _ in range(n)]

    def __len__(self):
        return len(self.sets)

    def __getitem__(self, i):
        return make_item(self.sets[i])

    def collate(self, items):
        return pad_collate(items, pad_value=1e4)  # garbage in the padding: it must never count


@pytest.fixture(scope="module", autouse=True)
def toy_datasets():
    """The toy datasets, registered by name for this module only (other tests list the registry)."""
    from difflab.data import registry

    names = {"toy_mixture": MixtureRows, "toy_waves": Waves, "toy_ragged": RaggedPoints}
    for name, cls in names.items():
        register_dataset(name)(lambda resolution, data_dir, num_images, seed, cls=cls, **kw: cls(num_images or 256, seed))
    yield
    for name in names:
        registry._BUILDERS.pop(name)


def _config(dataset, model, steps, **sections):
    raw = {"seed": 0, "data": {"dataset": dataset, "num_images": 512}, "model": model,
           "schedule": {"kind": "cosine", "num_timesteps": 100}, "objective": {"parameterization": "v", "weighting": "uniform"},
           "optim": {"steps": steps, "batch_size": 64, "lr": 3e-3, "warmup_steps": 10, "ema_decay": 0.9},
           "log": {"sample_every": 0, "checkpoint_every": 0, "num_samples": 4, "sample_steps": 5}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return TrainConfig.from_dict(raw)


def _mixture_fit(samples: torch.Tensor) -> float:
    """Fraction of samples within 3 std (per coordinate, both coordinates) of one of the two modes."""
    near = [((samples - m).abs() < 3 * MODE_STD).all(dim=1) for m in MODES]
    return float((near[0] | near[1]).float().mean())


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("mlp")
    train(_config("toy_mixture", {"_class_name": "GeneralityMLP"}, 400), out, progress=False)
    return out


def test_a_mlp_trains_reloads_by_class_name_and_samples_the_mixture(mlp_run, one_thread):
    from difflab import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(mlp_run)  # the class comes from config.json's _class_name
    assert type(pipe.unet).__name__ == "GeneralityMLP" and pipe.sample_shape == (2,)
    out = pipe(num_images=400, num_inference_steps=20, sampler="dpmpp_2m", seed=0, progress=False)
    # Pure N(0, I) noise lands near a mode with probability 2 * P(|z-2|<0.9)^2 ~ 0.07; a trained model puts
    # most samples there (a perfect one: 0.9946 = P(|z| < 3)^2).
    assert out.samples.shape == (400, 2) and _mixture_fit(out.samples) > 0.8
    # both modes are populated (not a collapse onto one): each has at least a quarter of the samples
    assert 0.25 < float((out.samples[:, 0] > 0).float().mean()) < 0.75


def test_a_mlp_trains_and_samples_through_the_cli(tmp_path, capsys, one_thread):
    config = tmp_path / "mlp.yaml"
    config.write_text(yaml.safe_dump(_config("toy_mixture", {"_class_name": "GeneralityMLP"}, 30).to_dict()))
    status, out, err = run_cli(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--no-progress"], capsys)
    assert status == 0, err
    samples = tmp_path / "samples.safetensors"
    status, out, err = run_cli(["sample", "--model", str(tmp_path / "run"), "--steps", "5", "--num-images", "6",
                                "--out", str(samples)], capsys)
    assert status == 0, err
    from safetensors.torch import load_file

    assert load_file(str(samples))["samples"].shape == (6, 2)


def test_b_1d_unet_trains_and_round_trips(tmp_path, one_thread):
    from difflab import DiffusionPipeline

    model = {"dims": 1, "base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
             "head_channels": 16, "norm_groups": 8}
    train(_config("toy_waves", model, 4, optim={"batch_size": 8}, log={"sample_every": 4}), tmp_path, progress=False)
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "samples" / "step_0000004.safetensors"))["samples"].shape == (4, 1, 32)
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert pipe.unet.config.dims == 1 and pipe.sample_shape == (1, 32)
    first = pipe(num_images=2, num_inference_steps=4, seed=3, progress=False).samples
    pipe.save_pretrained(tmp_path / "again")
    second = DiffusionPipeline.from_pretrained(tmp_path / "again")(num_images=2, num_inference_steps=4, seed=3,
                                                                    progress=False).samples
    assert first.shape == (2, 1, 32) and torch.equal(first, second)


def test_c_concat_conditioned_super_resolution_trains_and_samples(tmp_path, one_thread):
    from difflab import DiffusionPipeline
    from difflab.data import build_dataset

    model = {"base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
             "head_channels": 16, "norm_groups": 8}
    config = _config("shapes", model, 4, data={"resolution": 16, "num_images": 32, "low_res_factor": 4},
                     conditioning={"concat": "low_res", "concat_noise_aug": 0.2}, optim={"batch_size": 8})
    train(config, tmp_path, progress=False)
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    # the input convolution takes the data's 3 channels and the 3 concatenated ones; the output is the data's 3
    c = pipe.unet.config
    assert (c.in_channels, c.concat_channels, c.resolved_out_channels, c.aug_embedding) == (3, 3, 3, True)
    real = build_dataset("shapes", 16, num_images=2)
    low = torch.stack([torch.nn.functional.avg_pool2d(real[i]["x"][None], 4)[0] for i in range(2)])
    samples = pipe(num_images=2, num_inference_steps=4, seed=0, progress=False, concat={"low_res": low}).samples
    assert samples.shape == (2, 3, 16, 16)
    # The sampling denoiser feeds the network exactly (x_t, t, low-res, level 0): its prediction equals a direct
    # UNet call with those inputs, bit for bit (same float32 ops), and differs from a call without the condition.
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.full((2,), 40.0)
    with torch.no_grad():
        guided = pipe.denoiser(2, concat={"low_res": low}, aug_level=0.0)(x, t).prediction
        direct = pipe.unet(x, t, concat=low, aug_level=torch.zeros(2))
        blank = pipe.unet(x, t, concat=torch.zeros_like(low), aug_level=torch.zeros(2))
    assert torch.equal(guided, direct) and not torch.equal(direct, blank)


def test_d_ragged_masked_training_ignores_padding(tmp_path, one_thread):
    from difflab.recipes.diffusion import build_diffusion_training

    trainer = build_diffusion_training(_config("toy_ragged", {"_class_name": "GeneralityMLP"}, 3,
                                               optim={"batch_size": 8},
                                               objective={"weighting": "min_snr"}), tmp_path, progress=False)
    batch = trainer._local_batch(0)
    assert (batch["x"] == 1e4).any() and batch["mask"].shape == batch["x"].shape[:2]
    losses, _ = trainer.objective.loss(trainer.model, batch)
    assert torch.isfinite(losses).all()
    # Dense truth: each sample alone, cut to its real points, with the same t and noise.
    sched, model = trainer.objective.schedule, trainer.model
    for i in range(len(losses)):
        n = int(batch["mask"][i].sum())
        x0, eps, t = batch["x"][i:i + 1, :n], batch["noise"][i:i + 1, :n], batch["t"][i:i + 1]
        alpha, sigma = sched.alpha(t.double()).float(), sched.sigma(t.double()).float()
        pred = model(alpha * x0 + sigma * eps, t.float())
        target = alpha * eps - sigma * x0  # v-prediction (Salimans & Ho 2022)
        snr = float(alpha**2 / sigma**2)  # min-SNR-5 on the v loss: min(SNR, 5) / (SNR + 1) (Hang et al. 2023)
        dense = ((pred - target) ** 2).mean() * min(snr, 5.0) / (snr + 1) * batch["weights"][i]
        # float32 sums of <= 18 squared errors of O(1): agreement to a few ulps (1.2e-7 relative each)
        assert math.isclose(float(losses[i].detach()), float(dense.detach()), rel_tol=1e-5), i
    trainer.run()  # and it trains on the padded, masked batches


def test_non_square_images_train_sample_and_write(tmp_path, capsys, one_thread):
    """32x48-style layouts: a 16x24 digits model trains, exports sample_shape (1, 16, 24) and samples at it."""
    from PIL import Image

    from difflab import DiffusionPipeline

    model = {"base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
             "head_channels": 16, "norm_groups": 8}
    train(_config("digits", model, 3, data={"resolution": [16, 24], "num_images": 32}, optim={"batch_size": 8}),
          tmp_path / "run", progress=False)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "run")
    assert pipe.sample_shape == (1, 16, 24) and pipe.resolution is None
    out = pipe(num_images=2, num_inference_steps=3, seed=0, progress=False)
    assert out.samples.shape == (2, 1, 16, 24) and out.images[0].size == (24, 16)  # PIL sizes are (width, height)
    status, _, err = run_cli(["sample", "--model", str(tmp_path / "run"), "--steps", "3", "--num-images", "1",
                              "--out", str(tmp_path / "one.png")], capsys)
    assert status == 0, err
    assert Image.open(tmp_path / "one.png").size == (24 + 4, 16 + 4)  # one image and the grid's 2-pixel frame
