"""Reading and writing :class:`~difflab.pipelines.diffusion.DiffusionPipeline` folders.

v2 (written here)::

    model_index.json  {"_class_name": "DiffusionPipeline", "_difflab_format": 2, "unet": ["difflab", "UNet"],
                       "vae": ["difflab", "AutoencoderKL"] or [null, null], "schedule": {...},
                       "parameterization": "eps", "learn_variance": false, "sample_shape": [3, 32, 32],
                       "resolution": 32, "modality": "image", "sampler": "ddim", "conditioning": {...}, ...}
    unet/, vae/       component folders (docs/model_folders.md)

v1 (read only): a flat ``config.json`` + ``model.safetensors`` of the UNet with the settings beside its
config, and an optional ``vae/``; it loads with one deprecation warning.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from difflab.conditioning import Conditioner
from difflab.errors import UserError
from difflab.io.model_folder import CONFIG_NAME, WEIGHTS_NAME, load_model, read_model_config
from difflab.io.pipeline_folder import INDEX_NAME, read_pipeline_folder, save_pipeline_folder
from difflab.schedules import NoiseSchedule

CLASS_NAME = "DiffusionPipeline"
VAE_FOLDER = "vae"
_KNOWN = ("schedule", "parameterization", "learn_variance", "resolution", "sample_shape", "modality",
          "sampler", "conditioning")


def pipeline_settings(pipe: Any) -> dict[str, Any]:
    """What ``model_index.json`` stores besides the components."""
    return {
        "schedule": pipe.schedule.to_config(),
        "parameterization": pipe.parameterization,
        "learn_variance": pipe.learn_variance,
        "sample_shape": list(pipe.sample_shape),
        "resolution": pipe.resolution,
        "modality": pipe.modality,
        "sampler": pipe.sampler,
        "conditioning": pipe.conditioner.to_config(),
        **pipe.extra_config,
    }


def save_diffusion_pipeline(pipe: Any, path: Path) -> None:
    """Write ``pipe`` as a v2 pipeline folder (components first, the index last)."""
    save_pipeline_folder(path, CLASS_NAME, {"unet": pipe.unet, VAE_FOLDER: pipe.vae}, pipeline_settings(pipe))


def read_settings(path: Path) -> dict[str, Any]:
    """The pipeline settings of a v2 pipeline folder or a v1 model folder (e.g. to reuse its schedule)."""
    path = Path(path)
    if (path / INDEX_NAME).is_file():
        return read_pipeline_folder(path)[1]
    name, _, extra = read_model_config(path)
    _check_unet(path, name)
    return extra


def load_diffusion_pipeline(cls: type, path: Path) -> Any:
    """A ``cls`` (DiffusionPipeline) from a v2 pipeline folder or a v1 model folder."""
    from difflab.nets.autoencoder import AutoencoderKL
    from difflab.nets.unet import UNet

    if not path.is_dir():
        raise UserError(f"model folder {path} does not exist; pass a folder written by DiffusionPipeline.save_pretrained "
                        "(the --out folder of a training run)")
    if (path / INDEX_NAME).is_file():
        class_name, settings, specs = read_pipeline_folder(path)
        if class_name != CLASS_NAME:
            raise UserError(f"{path} holds a {class_name}, not a {CLASS_NAME}; load it with "
                            f"{'Text2ImagePipeline' if 'text_encoder' in specs else class_name}.from_pretrained")
        if "unet" not in specs:
            raise UserError(f"{path / INDEX_NAME} names no unet component; save the pipeline again")
        unet = load_model(specs["unet"].path)  # any registered denoising network, found by its _class_name
        vae = load_model(specs[VAE_FOLDER].path, expected=AutoencoderKL) if VAE_FOLDER in specs else None
    elif (path / CONFIG_NAME).is_file():
        if not (path / WEIGHTS_NAME).is_file():
            raise UserError(f"model folder {path} is missing {WEIGHTS_NAME}; it was not saved completely, export it again")
        name, _, _ = read_model_config(path)  # the one deprecation line of a v1 folder
        _check_unet(path, name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            unet = load_model(path, expected=UNet)
            vae = load_model(path / VAE_FOLDER, expected=AutoencoderKL) if (path / VAE_FOLDER / CONFIG_NAME).is_file() else None
        settings, unet.extra_config = unet.extra_config, {}
    else:
        raise UserError(f"{path} has neither {INDEX_NAME} nor {CONFIG_NAME}; pass a folder written by "
                        "DiffusionPipeline.save_pretrained (the --out folder of a training run)")
    return _build(cls, unet, vae, settings, path)


def _check_unet(path: Path, name: str) -> None:
    if name != "UNet":
        hint = "; pass it with --classifier / classifier=" if name == "NoisyClassifier" else ""
        raise UserError(f"{path} holds a {name}, not a diffusion model{hint}")


def _build(cls: type, unet: Any, vae: Any, settings: dict[str, Any], path: Path) -> Any:
    try:
        schedule = NoiseSchedule.from_config(settings["schedule"])
        shape = settings.get("sample_shape")
        resolution = None if shape is not None else int(settings["resolution"])  # v1: square, from resolution
        extra = {k: v for k, v in settings.items() if k not in _KNOWN}
        pipe = cls(unet, schedule, settings.get("parameterization", "eps"), resolution=resolution, sample_shape=shape,
                   modality=settings.get("modality", "image"), sampler=settings.get("sampler", "ddim"), conditioner=Conditioner.from_config(settings.get("conditioning")),
                   extra_config=extra, learn_variance=settings.get("learn_variance"), vae=vae)
    except KeyError as err:
        raise UserError(f"the settings of {path} lack the key {err}; re-export the model from its training run") from None
    return pipe
