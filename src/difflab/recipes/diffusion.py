"""A diffusion training from a :class:`~difflab.training.config.TrainConfig`: dataset, network, conditions,
objective and the pipeline the run exports, handed to the one :class:`~difflab.training.Trainer`.

This module sits above ``pipelines/`` and ``training/`` (it joins them); neither imports it.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab.errors import UserError
from difflab.nets.unet_config import LAYOUT_FIELDS, default_layout
from difflab.training.config import TrainConfig

PREVIEW_GUIDANCE = 3.0  # classifier-free guidance scale of the periodic sample grids
DEFAULT_NETWORK = "UNet"


def build_dataset_from_config(config: TrainConfig, out_dir: Path, accelerator: Any) -> tuple[Any, Any]:
    """The training dataset (latents of ``data.autoencoder`` if given, low-res pairs if asked) and the
    autoencoder to decode with (or None)."""
    from difflab.data import build_dataset

    d = config.data
    options = dict(d.options)
    if d.exclude:
        options["exclude"] = [tuple(pair) for pair in d.exclude]
    resolution = tuple(d.resolution) if isinstance(d.resolution, list) else d.resolution
    dataset = build_dataset(d.dataset, resolution, data_dir=d.data_dir, num_images=d.num_images, seed=config.seed, **options)
    vae = None
    if d.autoencoder:  # latent diffusion (Rombach et al. 2022): images replaced by scaled latents, encoded once
        from difflab.data.latents import LatentDataset
        from difflab.nets.autoencoder import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(d.autoencoder).to(accelerator.device).eval()
        cache = out_dir / "latents.safetensors" if accelerator.num_processes == 1 else None
        dataset = LatentDataset(dataset, vae, cache_path=cache)
    if d.low_res_factor:
        from difflab.data.pairs import LowResolutionPairs

        dataset = LowResolutionPairs(dataset, d.low_res_factor)
    if config.task == "inpaint":
        from difflab.data.pairs import PictureCondition

        dataset = PictureCondition(dataset)
    return dataset, vae


def build_conditioner(config: TrainConfig, dataset: Any) -> Any:
    from difflab.conditioning import ConcatCondition, Conditioner

    c = config.conditioning
    concat = None
    if c.concat:
        probe = dataset[0]["cond"]
        if c.concat not in probe:
            raise UserError(f"conditioning.concat={c.concat!r} but the items' conditions are {sorted(probe)}; "
                            "name one of them (data.low_res_factor makes 'low_res')")
        channels = int(probe[c.concat].shape[0]) + (1 if c.concat_masks else 0)  # inpainting: the picture and its mask
        concat = ConcatCondition(key=c.concat, channels=channels, noise_aug_max=c.concat_noise_aug or 0.0,
                                 resize=c.concat_resize or "bilinear", masks=c.concat_masks,
                                 schedule=config.schedule)  # augment with the model's own forward process (CDM)
    return Conditioner(c.kind, num_classes=dataset.num_classes, class_names=dataset.class_names,
                       text_encoder=c.text_encoder, concat=concat)


def build_network(model: dict[str, Any], given: dict[str, Any]) -> nn.Module:
    """The network named by ``model["_class_name"]`` (default UNet), configured by the other ``model`` keys plus
    those ``given`` fields (fixed by the data, conditions and objective) that its config class has; a ``model``
    key that contradicts a given value is a one-line error. A UNet whose ``model`` sets none of
    :data:`~difflab.nets.unet_config.LAYOUT_FIELDS` gets :func:`~difflab.nets.unet_config.default_layout`."""
    from difflab.io.registry import network_class

    fields = dict(model)
    cls = network_class(fields.pop("_class_name", DEFAULT_NETWORK))
    if cls.__name__ == DEFAULT_NETWORK and not set(fields) & set(LAYOUT_FIELDS):  # no layout chosen: the measured one
        fields = {**default_layout(tuple(given.get("sample_shape", ())), text="context_dim" in given), **fields}
    names = {f.name for f in dataclasses.fields(cls.config_class)}
    auto = {k: v for k, v in given.items() if k in names}
    for key, value in auto.items():
        if key in fields and fields[key] != value:
            raise UserError(f"model.{key}={fields[key]} but the data and conditioning fix it to {value}; remove the key")
    return cls(cls.config_class.from_dict({**fields, **auto}))


def network_fields(config: TrainConfig, dataset: Any, conditioner: Any) -> dict[str, Any]:
    """Config fields fixed by the data (channels, sample shape), the conditions and a learned variance."""
    channels = int(getattr(dataset, "channels", dataset.sample_shape[0]))  # a point set's features, not its length
    given: dict[str, Any] = {"in_channels": channels, "sample_shape": list(dataset.sample_shape)}
    given.update(conditioner.unet_fields())
    out = given.get("out_channels", channels)
    if config.objective.learn_variance:  # prediction and variance interpolation (Nichol & Dhariwal 2021)
        given["out_channels"] = 2 * out
    return given


def build_diffusion_training(config: TrainConfig, out_dir: str | Path, *, progress: bool = True,
                             oracle_settings: dict[str, Any] | None = None) -> Any:
    """A :class:`~difflab.training.Trainer` ready to run ``config`` into ``out_dir``; ``oracle_settings``
    override :data:`~difflab.metrics.shapes_adherence.ORACLE_SETTINGS` of the previews' prompt adherence."""
    from difflab.pipelines.diffusion import DiffusionPipeline
    from difflab.schedules import NoiseSchedule
    from difflab.training.distributed import make_accelerator
    from difflab.training.objectives import DiffusionObjective
    from difflab.training.trainer import Trainer

    out_dir = Path(out_dir)
    accelerator = make_accelerator(config.optim.mixed_precision)
    dataset, vae = build_dataset_from_config(config, out_dir, accelerator)
    conditioner = build_conditioner(config, dataset)
    torch.manual_seed(config.seed)
    model = build_network(config.model, network_fields(config, dataset, conditioner))
    schedule = NoiseSchedule.from_config(config.schedule)
    if config.objective.parameterization == "eps" and schedule.alphas_cumprod[-1] < 1e-6:
        warnings.warn(f"eps-prediction on a schedule whose alpha_bar_T is {schedule.alphas_cumprod[-1]:.1e}: "
                      "x0 = (x - sigma eps) / alpha multiplies eps errors by up to 1/alpha_T at the first sampling "
                      "step, which few-step samplers carry into the image; v-prediction avoids it (--parameterization v)")
    modality = getattr(dataset, "modality", "image")

    def pipeline(network: nn.Module) -> DiffusionPipeline:
        return DiffusionPipeline(network, schedule, config.objective.parameterization, sample_shape=tuple(dataset.sample_shape),
                                 modality=modality, sampler=config.log.sampler, conditioner=conditioner,
                                 extra_config={"dataset": config.data.dataset, **task_settings(config)}, vae=vae)

    preview = preview_kwargs(config, dataset, conditioner)
    objective = DiffusionObjective(schedule, config.objective, conditioner, dropout=config.conditioning.dropout,
                                   pipeline=pipeline, preview_kwargs=preview,
                                   preview_metrics=adherence_metrics(config, preview, accelerator, oracle_settings))
    return Trainer(model, dataset, objective, config, out_dir, progress=progress, accelerator=accelerator)


def task_settings(config: TrainConfig) -> dict[str, Any]:
    """What a pipeline folder records of the task: ``{"task": "super-resolution", "scale": f}`` for SR models,
    ``{"task": "inpaint"}`` for inpainting models."""
    if config.task == "super-resolution":
        return {"task": config.task, "scale": config.data.low_res_factor}
    return {"task": config.task} if config.task == "inpaint" else {}


def adherence_metrics(config: TrainConfig, preview: dict[str, Any], accelerator: Any,
                      oracle_settings: dict[str, Any] | None = None) -> Callable[[torch.Tensor], dict[str, float]] | None:
    """The previews' scores for log.jsonl when training on the built-in shapes with text (``log.adherence``):
    the shapes oracle's prompt adherence (``adherence_shape``, ``_color``, ``_shape_and_color``, ``_position``)
    and its accuracy on real images (``oracle_<attribute>_accuracy``); None otherwise."""
    c, log = config.conditioning, config.log
    if not (log.adherence and log.sample_every and config.data.dataset == "shapes" and c.kind == "text"):
        return None
    if accelerator.num_processes > 1:  # the oracle would train on the main process alone, inside a collective run
        warnings.warn("prompt adherence of the previews is logged in single-process runs only; score the model "
                      "afterwards with `difflab eval`", UserWarning, stacklevel=3)
        return None
    from difflab.data.shapes_spec import parse_caption
    from difflab.metrics.shapes_adherence import spec_adherence

    specs = [parse_caption(p) for p in preview["prompt"]]
    warned: list[bool] = []

    def score(samples: torch.Tensor) -> dict[str, float]:
        if samples.shape[-1] % 8 or samples.shape[-1] != samples.shape[-2]:
            if not warned:
                warned.append(True)
                warnings.warn(f"no prompt adherence in log.jsonl: the shapes oracle reads square images whose side is a "
                              f"multiple of 8, these are {tuple(samples.shape[-2:])}", UserWarning, stacklevel=2)
            return {}
        scores = spec_adherence(samples, specs, settings=oracle_settings)
        return {k if k.startswith("oracle_") else f"adherence_{k}": v for k, v in scores.items()}

    return score


def preview_kwargs(config: TrainConfig, dataset: Any, conditioner: Any) -> dict[str, Any]:
    """Pipeline arguments of the periodic previews: cycling labels, the first training captions, or the
    first training items' concat conditions."""
    log, n = config.log, config.log.num_samples
    kwargs: dict[str, Any] = {"num_images": n, "num_inference_steps": log.sample_steps}
    if conditioner.kind == "class":
        kwargs.update(class_labels=[i % conditioner.num_classes for i in range(n)], guidance_scale=PREVIEW_GUIDANCE)
    if conditioner.kind == "text":
        kwargs.update(prompt=[dataset[i % len(dataset)]["cond"]["caption"] for i in range(n)], guidance_scale=PREVIEW_GUIDANCE)
    if config.conditioning.concat:
        key = config.conditioning.concat
        value = torch.stack([dataset[i % len(dataset)]["cond"][key] for i in range(n)])
        if config.conditioning.concat_masks:  # inpainting previews: the first pictures under fixed random masks
            from difflab.data.masks import random_fill_masks

            fill = random_fill_masks(n, *value.shape[-2:], torch.Generator().manual_seed(0), tuple(config.conditioning.concat_masks))
            value = conditioner.concat.masked_input(value, ~fill)
        kwargs["concat"] = {key: value}
    return kwargs
