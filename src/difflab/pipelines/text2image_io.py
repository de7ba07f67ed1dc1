"""Text-to-image folders: ``model_index.json`` plus one subfolder per component.

The layout is diffusers' (Stable Diffusion's), so a folder of diffusers components that difflab writes
is still a diffusers folder::

    model_index.json   {"_class_name": ..., "unet": [library, class], "vae": ..., "text_encoder": ...,
                        "tokenizer": ..., "scheduler": ..., "_difflab": {"format", "text_encoder", "resolution"}}
    unet/              config.json + weights (diffusers: diffusion_pytorch_model.safetensors; difflab: model.safetensors)
    vae/               the same; absent for a pixel-space model ("vae": [null, null])
    text_encoder/      transformers config.json + model.safetensors
    tokenizer/         tokenizer files
    scheduler/         scheduler_config.json (diffusers) or config.json (difflab :class:`SchedulerSpec`)

``_difflab.text_encoder`` says how prompts are encoded (``{"kind": "clip_padded"}``, Stable Diffusion's way,
when absent); ``_difflab.resolution`` is the default latent (or pixel) size of a difflab model.
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
from difflab.pipelines.model_dir import CONFIG_NAME, ensure_writable_dir, load_weights, read_model_dir, save_model_dir

INDEX_NAME = "model_index.json"
FORMAT = "difflab.text2image/1"
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
    file = path / INDEX_NAME
    if not file.is_file():
        raise UserError(f"{path} has no {INDEX_NAME}; a text-to-image folder (difflab or diffusers format) needs one")
    index = json.loads(file.read_text())
    name = index.get("_class_name")
    if name not in PIPELINE_CLASSES:
        raise UserError(f"{file} names the pipeline class {name!r}, which difflab does not load; "
                        f"supported: {', '.join(PIPELINE_CLASSES)}")
    return index


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
    extra = index.get("_difflab", {})
    unet_lib, _ = component(index, path, "unet")
    vae_entry = component(index, path, "vae", optional=extra.get("format") == FORMAT)
    sched_lib, _ = component(index, path, "scheduler")
    component(index, path, "text_encoder")
    component(index, path, "tokenizer")
    unet = diffusers_sd.load_unet(path / "unet", dtype) if unet_lib == "diffusers" else _load_unet(path / "unet")
    vae = None
    if vae_entry is not None:
        vae = diffusers_sd.load_vae(path / "vae", dtype) if vae_entry[0] == "diffusers" else _load_vae(path / "vae")
    load_scheduler = diffusers_sd.load_scheduler if sched_lib == "diffusers" else _load_scheduler
    scheduler = load_scheduler(path / "scheduler")
    encoder = load_text_encoder_dir(path, extra.get("text_encoder", SD_TEXT_ENCODER), index["text_encoder"][1], dtype)
    return Components(unet, vae, encoder, scheduler, extra.get("resolution"))


def _load_unet(path: Path) -> nn.Module:
    from difflab.nets.unet import UNet
    from difflab.nets.unet_config import UNetConfig

    config, weights = read_model_dir(path)
    unet = UNet(UNetConfig.from_dict(config["model"]))
    load_weights(unet, weights, path)
    return unet.eval()


def _load_vae(path: Path) -> nn.Module:
    from difflab.nets.autoencoder import AutoencoderKL

    return AutoencoderKL.from_pretrained(path)


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
    """Write ``c`` as a folder (module docstring); diffusers components are written by diffusers."""
    path = ensure_writable_dir(Path(path))
    diffusers_unet = hasattr(c.unet, "unet")
    entries: dict[str, Any] = {"unet": ["diffusers", "UNet2DConditionModel"] if diffusers_unet else ["difflab", "UNet"]}
    if diffusers_unet:
        c.unet.save_pretrained(path / "unet")
    else:
        save_model_dir(path / "unet", {"model": c.unet.config.to_dict()}, c.unet)
    entries["vae"] = [None, None]
    if c.vae is not None:
        entries["vae"] = ["diffusers" if hasattr(c.vae, "vae") else "difflab", "AutoencoderKL"]
        c.vae.save_pretrained(path / "vae")
    entries.update(_save_text_encoder(c.text_encoder, path))
    entries["scheduler"] = _save_scheduler(c.scheduler, path / "scheduler")
    all_diffusers = diffusers_unet and entries["vae"][0] == "diffusers" and entries["scheduler"][0] == "diffusers"
    text = _text_spec(c.text_encoder)
    extra = {"format": FORMAT, "text_encoder": text, **({"resolution": c.resolution} if c.resolution else {})}
    index = {"_class_name": "StableDiffusionPipeline" if all_diffusers and text == SD_TEXT_ENCODER else "Text2ImagePipeline",
             **entries, "safety_checker": [None, None], "feature_extractor": [None, None],
             "requires_safety_checker": False, "_difflab": extra}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2))


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
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(spec.to_config(), indent=2))
    return ["difflab", "SchedulerSpec"]
