"""Text-to-image folders: ``model_index.json`` plus one subfolder per component.

The layout is diffusers' (Stable Diffusion's), so a folder of diffusers components that difflab writes
is still a diffusers folder::

    model_index.json   {"_class_name": ..., "_difflab_format": 2, "unet": [library, class], "vae": ...,
                        "text_encoder": ..., "tokenizer": ..., "scheduler": ..., "text_encoding": {...},
                        "resolution": ...}
    unet/              diffusers: config.json + diffusion_pytorch_model.safetensors; difflab: a component
                       folder (docs/model_folders.md), the same format as a DiffusionPipeline's
    vae/               the same; absent for a pixel-space model ("vae": [null, null])
    text_encoder/      transformers config.json + model.safetensors
    tokenizer/         tokenizer files
    scheduler/         scheduler_config.json (diffusers) or config.json (difflab :class:`SchedulerSpec`)

The index follows the conventions of :mod:`difflab.io.pipeline_folder` (components as ``[library, class]``,
settings at the top level, written last and atomically). ``text_encoding`` says how prompts are encoded
(``{"kind": "clip_padded"}``, Stable Diffusion's way, when absent); ``resolution`` is the default latent (or
pixel) size of a difflab model. Folders of the first text-to-image format (settings under ``_difflab``) still load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab.errors import UserError
from difflab.interop import diffusers_sd  # imports diffusers only when a diffusers component is loaded
from difflab.interop.diffusers_config import SchedulerSpec
from difflab.nets.text_base import TextEncoder
from difflab.io.files import atomic_write, ensure_writable_dir
from difflab.io.model_folder import CONFIG_NAME, FORMAT_VERSION, load_model, save_model
from difflab.io.pipeline_folder import INDEX_NAME, write_index
from difflab.io.pipeline_folder import read_index as read_pipeline_index

FORMAT_V1 = "difflab.text2image/1"  # settings under "_difflab" (read only)
DIFFUSION_PIPELINE = "DiffusionPipeline"
PIPELINE_CLASSES = ("StableDiffusionPipeline", "Text2ImagePipeline")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SD_TEXT_ENCODER = {"kind": "clip_padded"}
# Supported (library, class) per component; None: any class of that library.
_CLASSES: dict[str, dict[str, tuple[str, ...] | None]] = {
    "unet": {"diffusers": ("UNet2DConditionModel",), "difflab": ("UNet",)},
    "vae": {"diffusers": ("AutoencoderKL",), "difflab": ("AutoencoderKL",)},
    "text_encoder": {"transformers": None},
    "tokenizer": {"transformers": None},
    "scheduler": {"diffusers": diffusers_sd.VP_SCHEDULERS, "difflab": ("SchedulerSpec",)},
}


@dataclass
class Components:
    """What a text-to-image pipeline is made of (``vae=None``: pixel space)."""

    unet: nn.Module
    vae: Any
    text_encoder: TextEncoder
    scheduler: SchedulerSpec
    resolution: int | None = None


def check_dtype(dtype: torch.dtype | str | None, device: torch.device | str) -> torch.dtype:
    """``dtype`` if ``device`` can run it, else a UserError: float16 needs a GPU; bfloat16 a CPU or a GPU with bf16."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype in ("float32", "float16", "bfloat16") else dtype
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UserError(f"torch_dtype={dtype!r} is not supported; use torch.float32, torch.float16 or torch.bfloat16")
    kind = torch.device(device).type
    if dtype == torch.float16 and kind == "cpu":
        raise UserError("torch_dtype=float16 needs a GPU (device='cuda' or 'mps'); on the CPU use torch.bfloat16 or float32")
    if dtype == torch.bfloat16 and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU cannot run bfloat16; use torch_dtype=torch.float16 or float32")
    return dtype


def read_index(path: Path) -> dict[str, Any]:
    """``model_index.json`` of ``path``, with one-line errors for a missing folder, file or pipeline class."""
    if not path.is_dir():
        raise UserError(f"model folder {path} does not exist; pass a folder with model_index.json")
    if not (path / INDEX_NAME).is_file():
        raise UserError(f"{path} has no {INDEX_NAME}; a text-to-image folder (difflab or diffusers format) needs one")
    index = read_pipeline_index(path)
    name = index.get("_class_name")
    if name not in PIPELINE_CLASSES:
        raise UserError(f"{path / INDEX_NAME} names the pipeline class {name!r}, which difflab does not load; "
                        f"supported: {', '.join(PIPELINE_CLASSES)}")
    return index


def is_diffusion_pipeline_folder(path: Path) -> bool:
    """Whether ``path`` holds a DiffusionPipeline (v2 index, or a v1 flat ``config.json``), not a text-to-image folder."""
    if (path / INDEX_NAME).is_file():
        return read_pipeline_index(path).get("_class_name") == DIFFUSION_PIPELINE
    return (path / CONFIG_NAME).is_file()


def settings_of(index: dict[str, Any]) -> dict[str, Any]:
    """``text_encoding`` and ``resolution`` of an index (top level in format 2, under ``_difflab`` before)."""
    if index.get("_difflab_format") == FORMAT_VERSION:
        return {"text_encoding": index.get("text_encoding", SD_TEXT_ENCODER), "resolution": index.get("resolution"),
                "difflab": True}
    old = index.get("_difflab", {})
    return {"text_encoding": old.get("text_encoder", SD_TEXT_ENCODER), "resolution": old.get("resolution"),
            "difflab": old.get("format") == FORMAT_V1}


def component(index: dict[str, Any], path: Path, name: str, optional: bool = False) -> tuple[str, str] | None:
    """``(library, class)`` of component ``name`` after checking its class and that its subfolder exists."""
    entry = index.get(name)
    if not entry or entry[0] is None:
        if optional:
            return None
        raise UserError(f"the model folder {path} has no {name} component in {INDEX_NAME}; it needs "
                        f"{', '.join(c for c in COMPONENTS if c != 'vae')} (and vae for a latent model)")
    library, cls = entry
    allowed = _CLASSES[name]
    if library not in allowed or (allowed[library] is not None and cls not in allowed[library]):
        choices = ", ".join(f"{lib}.{c}" for lib, cs in allowed.items() for c in (cs or ("*",)))
        raise UserError(f"{name} class {library}.{cls} is not supported; difflab loads {choices}")
    if not (path / name).is_dir():
        raise UserError(f"the {name} component is missing: {path / name} does not exist")
    return library, cls


def load_components(path: Path, dtype: torch.dtype) -> Components:
    """Every component of the folder ``path``, networks in ``dtype`` (difflab networks stay float32)."""
    index = read_index(path)
    settings = settings_of(index)
    unet_lib, _ = component(index, path, "unet")
    vae_entry = component(index, path, "vae", optional=settings["difflab"])
    sched_lib, _ = component(index, path, "scheduler")
    component(index, path, "text_encoder")
    component(index, path, "tokenizer")
    unet = diffusers_sd.load_unet(path / "unet", dtype) if unet_lib == "diffusers" else _load_unet(path / "unet")
    vae = None
    if vae_entry is not None:
        vae = diffusers_sd.load_vae(path / "vae", dtype) if vae_entry[0] == "diffusers" else _load_vae(path / "vae")
    load_scheduler = diffusers_sd.load_scheduler if sched_lib == "diffusers" else _load_scheduler
    scheduler = load_scheduler(path / "scheduler")
    encoder = load_text_encoder_dir(path, settings["text_encoding"], index["text_encoder"][1], dtype)
    return Components(unet, vae, encoder, scheduler, settings["resolution"])


def _load_unet(path: Path) -> nn.Module:
    from difflab.nets.unet import UNet

    return load_model(path, expected=UNet)


def _load_vae(path: Path) -> nn.Module:
    from difflab.nets.autoencoder import AutoencoderKL

    return load_model(path, expected=AutoencoderKL)


def _load_scheduler(path: Path) -> SchedulerSpec:
    if not (path / CONFIG_NAME).is_file():
        raise UserError(f"{path} has no {CONFIG_NAME}; re-save the pipeline with save_pretrained")
    return SchedulerSpec.from_config(json.loads((path / CONFIG_NAME).read_text()))


def load_text_encoder_dir(path: Path, spec: dict[str, Any], model_class: str, dtype: torch.dtype) -> TextEncoder:
    """The text encoder in ``path/text_encoder`` with the tokenizer in ``path/tokenizer``, encoding as ``spec`` says."""
    from difflab.interop.sd_text import PaddedCLIPEncoder
    from difflab.nets.text_encoder import ENCODERS

    kind = spec.get("kind")
    families = {PaddedCLIPEncoder.kind: PaddedCLIPEncoder, **ENCODERS}
    if kind not in families:
        raise UserError(f"text encoding {kind!r} in {path / INDEX_NAME} is unknown; use one of {', '.join(families)}")
    if kind == PaddedCLIPEncoder.kind and model_class != "CLIPTextModel":
        raise UserError(f"text_encoder class transformers.{model_class} is not supported for Stable Diffusion folders; "
                        "difflab loads transformers.CLIPTextModel")
    encoder = families[kind](path / "text_encoder", path / "tokenizer", max_length=spec.get("max_length"))
    encoder.model.to(dtype)
    return encoder


def save_components(c: Components, path: Path) -> None:
    """Write ``c`` as a folder (module docstring); diffusers components are written by diffusers, difflab
    networks by :func:`~difflab.io.model_folder.save_model`, and the index last."""
    path = ensure_writable_dir(Path(path))
    entries: dict[str, Any] = {"unet": _save_network(c.unet, path / "unet", "UNet2DConditionModel"), "vae": [None, None]}
    if c.vae is not None:
        entries["vae"] = _save_network(c.vae, path / "vae", "AutoencoderKL")
    entries.update(_save_text_encoder(c.text_encoder, path))
    entries["scheduler"] = _save_scheduler(c.scheduler, path / "scheduler")
    entries.update({"safety_checker": [None, None], "feature_extractor": [None, None]})
    all_diffusers = all(entries[k][0] == "diffusers" for k in ("unet", "vae", "scheduler"))
    text = _text_spec(c.text_encoder)
    name = "StableDiffusionPipeline" if all_diffusers and text == SD_TEXT_ENCODER else "Text2ImagePipeline"
    settings = {"requires_safety_checker": False, "text_encoding": text,
                **({"resolution": c.resolution} if c.resolution else {})}
    write_index(path, name, entries, settings)


def _save_network(model: nn.Module, path: Path, diffusers_class: str) -> list[str]:
    """Write a UNet or VAE: a diffusers wrapper (it has ``.unet`` / ``.vae``) by diffusers, a difflab network by save_model."""
    if hasattr(model, "unet") or hasattr(model, "vae"):
        model.save_pretrained(path)
        return ["diffusers", diffusers_class]
    save_model(path, model)
    return ["difflab", type(model).__name__]


def _text_spec(encoder: TextEncoder) -> dict[str, Any]:
    kind = "bert" if encoder.kind == "minilm" else encoder.kind  # MiniLM is a BERT model once written out
    return {"kind": kind} if kind == SD_TEXT_ENCODER["kind"] else {"kind": kind, "max_length": encoder.max_length}


def _save_text_encoder(encoder: TextEncoder, path: Path) -> dict[str, list[str]]:
    if not hasattr(encoder, "model") or not hasattr(encoder, "tokenizer"):
        raise UserError(f"text encoder {type(encoder).__name__} cannot be written into a folder; use a "
                        "transformers-based encoder (minilm, clip, t5, bert)")
    encoder.model.save_pretrained(str(path / "text_encoder"))
    encoder.tokenizer.save_pretrained(str(path / "tokenizer"))
    return {"text_encoder": ["transformers", type(encoder.model).__name__],
            "tokenizer": ["transformers", type(encoder.tokenizer).__name__]}


def _save_scheduler(spec: SchedulerSpec, path: Path) -> list[str]:
    if spec.diffusers_config is not None:
        diffusers_sd.save_scheduler(spec, path)
        return ["diffusers", spec.diffusers_config.get("_class_name", "DDIMScheduler")]
    text = json.dumps(spec.to_config(), indent=2)
    atomic_write(ensure_writable_dir(path) / CONFIG_NAME, lambda p: p.write_text(text))
    return ["difflab", "SchedulerSpec"]
