"""``difflab train-cascade``: train the stages of an Imagen-like cascade one after the other and write the
cascade folder (:mod:`difflab.pipelines.cascade`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from difflab.errors import UserError


def read_cascade_config(path: Path) -> dict[str, dict[str, Any]]:
    """``{stage name: TrainConfig mapping}`` from a YAML file ``stages: {name: mapping or path to a YAML}``."""
    import yaml

    if not path.is_file():
        raise UserError(f"cascade config {path} does not exist; pass an existing YAML file to --config")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"cascade config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    stages = raw.get("stages") if isinstance(raw, dict) else None
    if not isinstance(stages, dict) or len(stages) < 2 or set(raw) != {"stages"}:
        raise UserError(f"cascade config {path} must be `stages:` mapping two or more stage names (base first) to "
                        "a training config or the path of one")
    out = {}
    for name, value in stages.items():
        if isinstance(value, str):
            file = (path.parent / value) if not Path(value).is_absolute() else Path(value)
            if not file.is_file():
                raise UserError(f"stage {name}: config file {file} does not exist")
            value = yaml.safe_load(file.read_text()) or {}
        if not isinstance(value, dict):
            raise UserError(f"stage {name} must be a training config mapping or the path of a YAML file")
        out[str(name)] = value
    return out


@click.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="YAML: `stages:` name -> training config (or its path), the base first, then the super-resolution stages.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="The cascade folder: one run folder per stage and model_index.json.")
@click.option("--resume", is_flag=True, help="Continue every unfinished stage where it stopped.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bars.")
def train_cascade_command(config_path: str, out_dir: str, resume: bool, no_progress: bool) -> None:
    """Train an Imagen-like cascade: a base model, then super-resolution stages, into one folder."""
    from difflab.pipelines.cascade import CascadePipeline, write_cascade_index
    from difflab.recipes import train
    from difflab.training import TrainConfig

    stages = read_cascade_config(Path(config_path))
    configs = {name: TrainConfig.from_dict(raw) for name, raw in stages.items()}  # every stage checked before any trains
    for name, config in list(configs.items())[1:]:
        if config.task != "super-resolution":
            raise UserError(f"stage {name} must train a super-resolution model (task: super-resolution), got task {config.task!r}")
    out = Path(out_dir)
    for name, config in configs.items():
        click.echo(f"stage {name}: training into {out / name}")
        result = train(config, out / name, resume=resume, progress=not no_progress)
        click.echo(result.note or f"stage {name}: {result.step} steps, final loss {result.loss:.4f}")
    write_cascade_index(out, list(configs))
    CascadePipeline.from_pretrained(out)  # the stages' sizes must meet
    click.echo(f"cascade written to {out} (stages {', '.join(configs)})")
