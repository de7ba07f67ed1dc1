"""The command line: the happy path, and one clear line with exit status 2 for each bad input."""

import subprocess
import sys

import pytest
import yaml
from PIL import Image

from conftest import run_cli as run
from conftest import tiny_config_dict
from difflab.cli import main




def assert_user_error(argv, capsys, match):
    code, _, err = run(argv, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert match in err, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    cfg = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config_dict()))
    main(["train", "--config", str(cfg), "--out", str(out), "--no-progress"])
    return out, cfg


def test_train_and_sample(trained, tmp_path, capsys):
    out, _ = trained
    code, stdout, _ = run(["sample", "--model", str(out), "--steps", "4", "--num-images", "5", "--batch-size", "2",
                           "--out", str(tmp_path / "grid.png"), "--no-progress"], capsys)
    assert code == 0 and "wrote 5 samples" in stdout and "4 network evaluations" in stdout
    assert Image.open(tmp_path / "grid.png").size[0] > 16


def test_sample_seed_is_batch_independent(trained, tmp_path, capsys):
    import numpy as np

    out, _ = trained
    for bs in (1, 3):
        run(["sample", "--model", str(out), "--steps", "3", "--num-images", "3", "--batch-size", str(bs),
             "--sampler", "ddim", "--eta", "1", "--out", str(tmp_path / f"g{bs}.png"), "--no-progress"], capsys)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g1.png")), np.asarray(Image.open(tmp_path / "g3.png")))


def test_bad_inputs(trained, tmp_path, capsys):
    out, cfg = trained
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("optim:\n  stepz: 3\n")
    assert_user_error(["train", "--config", str(bad_cfg), "--out", str(tmp_path / "x")], capsys, "unknown config key optim.stepz")
    assert_user_error(["train", "--steps", "-5", "--out", str(tmp_path / "x")], capsys, "optim.steps=-5")
    assert_user_error(["train", "--dataset", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], capsys, "nowhere")
    (tmp_path / "empty").mkdir()
    assert_user_error(["train", "--dataset", str(tmp_path / "empty"), "--out", str(tmp_path / "x")], capsys, "empty")
    assert_user_error(["train", "--config", str(cfg), "--out", str(out)], capsys, "already holds a training run")
    assert_user_error(["sample", "--model", str(tmp_path / "missing")], capsys, "does not exist")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    assert_user_error(["sample", "--model", str(tmp_path / "half")], capsys, "missing model.safetensors")
    assert_user_error(["sample", "--model", str(out), "--sampler", "warp"], capsys, "valid names")
    one = ["--num-images", "1", "--out", str(tmp_path / "g.png")]
    assert_user_error(["sample", "--model", str(out), "--eta", "1.5", *one], capsys, "eta")
    assert_user_error(["sample", "--model", str(out), "--steps", "0", *one], capsys, "steps")
    assert_user_error(["sample", "--model", str(out), "--steps", "101", "--sampler", "ddim", *one], capsys, "T=100")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_user_error(["sample", "--model", str(out), "--out", str(blocker / "g.png")], capsys, "cannot write")


def test_other_architecture_in_model_dir(trained, tmp_path, capsys):
    import json
    import shutil

    out, _ = trained
    shutil.copytree(out, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "unet" / "config.json").read_text())
    cfg["config"]["base_channels"] = 8
    (tmp_path / "m" / "unet" / "config.json").write_text(json.dumps(cfg))
    assert_user_error(["sample", "--model", str(tmp_path / "m")], capsys, "another model")


def test_module_entry_point_and_help():
    for cmd in ([sys.executable, "-m", "difflab", "train", "--help"], [sys.executable, "-m", "difflab", "sample", "--help"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0
        for flag in ("--out", "--steps"):
            assert flag in done.stdout


@pytest.mark.parametrize("text, kind", [("- seed\n- data\n", "got a list"), ("just words\n", "got a str"),
                                        ("42\n", "got a int")])
def test_config_top_level_not_a_mapping(tmp_path, capsys, text, kind):
    cfg = tmp_path / "x.yaml"
    cfg.write_text(text)
    assert_user_error(["train", "--config", str(cfg), "--out", str(tmp_path / "run")], capsys,
                      f"config file {cfg} must be a mapping of sections (seed, data, model, ...), {kind}")


def test_the_weighting_flag_offers_every_registered_weighting():
    """The CLI lists the choices by hand (it must not import torch to start); they must match the registry."""
    from difflab.cli.train import train as train_command
    from difflab.losses import WEIGHTINGS

    option = next(p for p in train_command.params if p.name == "weighting")
    assert set(option.type.choices) == set(WEIGHTINGS)



def _declared_default(dotted: str) -> object:
    """The default a TrainConfig field declares (before any resolution, so weighting is "auto")."""
    import dataclasses

    from difflab.training.config import TrainConfig

    cls: type = TrainConfig
    *sections, leaf = dotted.split(".")
    for section in sections:
        cls = type(getattr(cls(), section))
    field = next(f for f in dataclasses.fields(cls) if f.name == leaf)
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def test_the_train_flags_state_the_config_defaults():
    """Each ``[default: X]`` in ``difflab train --help`` is the TrainConfig default of the flag's key (the help is
    written by hand so that the CLI starts without torch; this catches a default changed in one place only)."""
    import re

    from difflab.cli.train import FLAG_KEYS, train as train_command

    checked = 0
    for param in train_command.params:
        stated = re.search(r"\[default: ([^\]]+)\]", param.help or "")
        if param.name not in FLAG_KEYS or not stated:
            continue
        text, value = stated.group(1), _declared_default(FLAG_KEYS[param.name])
        if value is None:  # "none", "the dataset's", "$DIFFLAB_DATA_DIR": words for an unset key
            assert text in ("none", "the dataset's", "$DIFFLAB_DATA_DIR"), (param.name, text)
        elif isinstance(value, bool):
            assert text == {False: "fixed", True: "learned"}[value], (param.name, text)
        elif isinstance(value, (int, float)):
            assert float(text) == value, (param.name, text, value)
        else:
            assert text == value, (param.name, text, value)
        checked += 1
    assert checked >= 15


def test_the_task_flag_offers_every_task():
    from difflab.cli.train import train as train_command
    from difflab.training.config import TASKS

    option = next(p for p in train_command.params if p.name == "task")
    assert tuple(option.type.choices) == TASKS
