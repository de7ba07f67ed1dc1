"""The one component-folder format (difflab.io): round trips, atomicity, and one-line errors."""

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from difflab.errors import UserError
from difflab.io import PretrainedModel, load_model, network_names, read_model_config, register_network, save_model
from difflab.io import model_folder
from difflab.io.configs import JsonConfig
from difflab.io.pipeline_folder import INDEX_NAME, read_pipeline_folder, save_pipeline_folder
from difflab.metrics.domain import DigitClassifier, DigitClassifierConfig
from difflab.metrics.shapes_oracle import ShapesOracle, ShapesOracleConfig
from difflab.nets.autoencoder import AutoencoderConfig, AutoencoderKL
from difflab.nets.classifier import ClassifierConfig, NoisyClassifier
from difflab.nets.discriminator import PatchDiscriminator
from difflab.nets.unet import UNet, UNetConfig


@dataclass
class ToyConfig(JsonConfig):
    width: int = 8
    depth: int = 2


@register_network
class ToyMLP(PretrainedModel, nn.Module):
    """A network registered by a test, to show that registration alone makes it loadable."""

    config_class = ToyConfig

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.Sequential(*[nn.Linear(config.width, config.width) for _ in range(config.depth)])

    def forward(self, x):
        return self.layers(x)


def _models():
    torch.manual_seed(0)
    return {
        "UNet": (UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, norm_groups=4,
                                 head_channels=8, num_classes=3)), lambda m, x: m(x, 3.0, class_labels=torch.tensor([0, 2])),
                 (2, 3, 8, 8)),
        "AutoencoderKL": (AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mults=(1, 2), norm_groups=4,
                                                          latent_channels=2, scaling_factor=0.5)),
                          lambda m, x: m.decode(m.encode(x).mode()), (2, 3, 8, 8)),
        "NoisyClassifier": (NoisyClassifier(ClassifierConfig(base_channels=8, channel_mults=(1, 2), norm_groups=4,
                                                             num_classes=4)), lambda m, x: m(x, 7.0), (2, 3, 8, 8)),
        "DigitClassifier": (DigitClassifier(DigitClassifierConfig(channels=(4, 8), feature_dim=16)),
                            lambda m, x: m(x)[1], (2, 1, 28, 28)),
        "ShapesOracle": (ShapesOracle(ShapesOracleConfig(resolution=16, width=8)),
                         lambda m, x: m(x)["shape"], (2, 3, 16, 16)),
        "PatchDiscriminator": (PatchDiscriminator(3, 16, base_channels=8, norm_groups=4), lambda m, x: m(x), (2, 3, 16, 16)),
        "ToyMLP": (ToyMLP(ToyConfig()), lambda m, x: m(x), (2, 8)),
    }


@pytest.mark.parametrize("name", list(_models()))
def test_round_trip_by_class_name_is_bit_identical(name, tmp_path, one_thread):
    model, run, shape = _models()[name]
    model.eval()
    model.save_pretrained(tmp_path / name, extra={"note": "kept"})
    saved = json.loads((tmp_path / name / "config.json").read_text())
    assert saved["_class_name"] == name and saved["_difflab_format"] == 2 and saved["note"] == "kept"
    again = load_model(tmp_path / name)  # no class given: found by _class_name
    assert type(again) is type(model) and not again.training and again.extra_config == {"note": "kept"}
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(run(model, x), run(again, x))
    assert type(model).from_pretrained(tmp_path / name).config == model.config


def test_registry_lists_every_builtin_network_and_the_toy():
    names = network_names()
    for name in ("UNet", "AutoencoderKL", "NoisyClassifier", "DigitClassifier", "ShapesCLIP", "ShapesOracle", "PatchDiscriminator", "ToyMLP"):
        assert name in names


def test_extra_is_kept_when_saving_again(tmp_path):
    clf = NoisyClassifier(ClassifierConfig(base_channels=8, channel_mults=(1,), attention_levels=(), norm_groups=4, num_classes=2))
    clf.save_pretrained(tmp_path / "a", extra={"schedule": {"kind": "linear", "num_timesteps": 10}})
    loaded = NoisyClassifier.from_pretrained(tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")
    assert read_model_config(tmp_path / "b")[2] == {"schedule": {"kind": "linear", "num_timesteps": 10}}


def test_a_crash_before_the_config_leaves_no_readable_folder(tmp_path, monkeypatch):
    real = model_folder.atomic_write

    def crash_on_config(path, write):
        if path.name == model_folder.CONFIG_NAME:
            raise OSError("disk full")
        real(path, write)

    monkeypatch.setattr(model_folder, "atomic_write", crash_on_config)
    with pytest.raises(OSError):
        save_model(tmp_path / "m", ToyMLP(ToyConfig()))
    assert not (tmp_path / "m" / "config.json").exists()
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(UserError, match="no config.json; it was not saved completely"):
        load_model(tmp_path / "m")


def test_a_crash_before_the_index_leaves_no_readable_pipeline(tmp_path, monkeypatch):
    from difflab.io import pipeline_folder

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pipeline_folder, "write_index", crash)
    with pytest.raises(OSError):
        save_pipeline_folder(tmp_path / "p", "DiffusionPipeline", {"unet": ToyMLP(ToyConfig())}, {})
    with pytest.raises(UserError, match="not saved completely"):
        read_pipeline_folder(tmp_path / "p")


def test_pipeline_folder_round_trip(tmp_path):
    save_pipeline_folder(tmp_path / "p", "DiffusionPipeline", {"unet": ToyMLP(ToyConfig()), "vae": None},
                         {"sample_shape": [3, 32, 48], "sampler": "ddim"})
    index = json.loads((tmp_path / "p" / INDEX_NAME).read_text())
    assert index["unet"] == ["difflab", "ToyMLP"] and index["vae"] == [None, None] and index["_difflab_format"] == 2
    name, settings, specs = read_pipeline_folder(tmp_path / "p")
    assert name == "DiffusionPipeline" and settings == {"sample_shape": [3, 32, 48], "sampler": "ddim"}
    assert list(specs) == ["unet"] and isinstance(load_model(specs["unet"].path), ToyMLP)


def test_wrong_class_is_a_one_line_error(tmp_path):
    ToyMLP(ToyConfig()).save_pretrained(tmp_path / "toy")
    with pytest.raises(UserError, match=r"holds a ToyMLP \(ToyMLP\), not an autoencoder") as err:
        AutoencoderKL.from_pretrained(tmp_path / "toy")
    assert "\n" not in str(err.value)


def test_unknown_class_name_lists_the_registered_ones(tmp_path):
    ToyMLP(ToyConfig()).save_pretrained(tmp_path / "toy")
    config = json.loads((tmp_path / "toy" / "config.json").read_text())
    (tmp_path / "toy" / "config.json").write_text(json.dumps({**config, "_class_name": "Nope"}))
    with pytest.raises(UserError, match=r"unknown network class 'Nope'; registered networks are: .*UNet") as err:
        load_model(tmp_path / "toy")
    assert "\n" not in str(err.value)


def test_corrupt_or_mismatched_weights_are_one_line_errors(tmp_path):
    ToyMLP(ToyConfig()).save_pretrained(tmp_path / "toy")
    (tmp_path / "toy" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="model.safetensors is unreadable") as err:
        load_model(tmp_path / "toy")
    assert "\n" not in str(err.value)
    ToyMLP(ToyConfig(depth=3)).save_pretrained(tmp_path / "deep")
    (tmp_path / "deep" / "config.json").write_text((tmp_path / "deep" / "config.json").read_text().replace('"depth": 3', '"depth": 2'))
    with pytest.raises(UserError, match=r"do not fit the architecture .*unexpected layers\.2\.bias"):
        load_model(tmp_path / "deep")


def test_v1_classifier_folder_warns_once(recwarn):
    from pathlib import Path

    clf = NoisyClassifier.from_pretrained(Path(__file__).parent / "fixtures" / "v1" / "classifier")
    lines = [w for w in recwarn if issubclass(w.category, DeprecationWarning)]
    assert len(lines) == 1 and "is a difflab v1 model folder; it loads, but re-save it with save_pretrained" in str(lines[0].message)
    assert clf.extra_config == {"schedule": {"kind": "linear", "num_timesteps": 50}}


def test_reserved_extra_keys_and_unregistered_classes_are_refused(tmp_path):
    with pytest.raises(UserError, match="reserved"):
        save_model(tmp_path / "x", ToyMLP(ToyConfig()), extra={"config": 1})

    class Loose(ToyMLP):  # same contract, never registered
        pass

    with pytest.raises(UserError, match="unknown network class 'Loose'"):
        save_model(tmp_path / "y", Loose(ToyConfig()))


# ----- pipeline folders ------------------------------------------------------------------------------


def test_v1_pipeline_resaved_as_v2_loads_without_warning_and_samples_identically(tmp_path, recwarn, one_thread):
    import warnings
    from pathlib import Path

    from safetensors.torch import load_file

    from difflab import DiffusionPipeline

    v1 = Path(__file__).parent / "fixtures" / "v1"
    pipe = DiffusionPipeline.from_pretrained(v1 / "latent")
    assert len([w for w in recwarn if issubclass(w.category, DeprecationWarning)]) == 1
    assert pipe.sample_shape == (2, 4, 4) and pipe.modality == "image"
    pipe.save_pretrained(tmp_path / "v2")
    index = json.loads((tmp_path / "v2" / INDEX_NAME).read_text())
    assert index["_class_name"] == "DiffusionPipeline" and index["unet"] == ["difflab", "UNet"]
    assert index["vae"] == ["difflab", "AutoencoderKL"] and index["sample_shape"] == [2, 4, 4]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        again = DiffusionPipeline.from_pretrained(tmp_path / "v2")
    out = again(num_images=2, num_inference_steps=3, seed=5, progress=False)
    # v1's own samples, to float32 rounding across CPUs (tests/test_v1_folders.py says why 1e-5)
    torch.testing.assert_close(out.samples, load_file(str(v1 / "reference_outputs.safetensors"))["latent_ddim"],
                               rtol=0, atol=1e-5)


def test_non_square_sample_shape_round_trips(tmp_path, one_thread):
    from difflab import DiffusionPipeline
    from difflab.schedules import NoiseSchedule

    torch.manual_seed(0)
    unet = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, norm_groups=4, head_channels=8))
    pipe = DiffusionPipeline(unet, NoiseSchedule.from_config({"kind": "linear", "num_timesteps": 20}),
                             sample_shape=(3, 8, 16))
    assert pipe.resolution is None
    pipe.save_pretrained(tmp_path / "p")
    again = DiffusionPipeline.from_pretrained(tmp_path / "p")
    assert again.sample_shape == (3, 8, 16)
    a = pipe(num_images=1, num_inference_steps=2, seed=0, progress=False).samples
    assert a.shape == (1, 3, 8, 16)
    assert torch.equal(a, again(num_images=1, num_inference_steps=2, seed=0, progress=False).samples)
    with pytest.raises(UserError, match="contradicts"):
        DiffusionPipeline(unet, pipe.schedule, resolution=8, sample_shape=(3, 8, 16))
