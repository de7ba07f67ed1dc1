"""Stable-Diffusion-format components (diffusers) behind difflab's interfaces.

A diffusers folder holds ``model_index.json`` and one subfolder per component. The networks stay
diffusers modules, wrapped by two small adapters:

* :class:`DiffusersUNet`: ``UNet2DConditionModel`` as a difflab ``model_fn(x, t, context=...)``
  (the text tokens go to ``encoder_hidden_states``);
* :class:`DiffusersVAE`: ``AutoencoderKL`` with difflab's autoencoder interface (``encode`` -> a diagonal
  Gaussian, ``decode``, ``latent_channels``, ``downsample_factor``, ``scaling_factor``).

The text encoder is :class:`~difflab.interop.sd_text.PaddedCLIPEncoder` and the scheduler config becomes a
:class:`~difflab.interop.diffusers_config.SchedulerSpec`; sampling is difflab's. diffusers is an optional
dependency (``pip install 'difflab[diffusers]'``), imported only when such a folder is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difflab.errors import UserError
from difflab.interop.diffusers_config import SchedulerSpec

INSTALL_HINT = "pip install 'difflab[diffusers]'"
SCHEDULER_CONFIG = "scheduler_config.json"
# Scheduler classes of discrete-time VP models: only their config (betas, prediction type, spacing) is read.
VP_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
                 "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler",
                 "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                 "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler")
# UNet features outside text-conditioned eps/v/x0 prediction (SDXL, LCM, upscalers, ...).
_UNET_EXTRAS = ("addition_embed_type", "class_embed_type", "time_cond_proj_dim", "encoder_hid_dim_type")


def require_diffusers() -> Any:
    """The ``diffusers`` module, or a UserError saying how to install it."""
    try:
        import diffusers
    except ImportError as err:
        raise UserError(f"loading a diffusers-format model needs the diffusers package; {INSTALL_HINT}") from err
    return diffusers


class DiffusersUNet(nn.Module):
    """``UNet2DConditionModel`` as ``model_fn(x, t, context=None, context_mask=None, pooled_context=None)``.

    ``t`` (index units, float) is passed as the UNet's timestep, ``context`` as ``encoder_hidden_states``;
    inputs are cast to the UNet's dtype and the prediction back to ``x``'s. ``context_mask`` and
    ``pooled_context`` are accepted and unused: SD attends to every padded position and has no pooled input.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        extras = [k for k in _UNET_EXTRAS if unet.config.get(k) is not None]
        if extras:
            raise UserError(f"the UNet2DConditionModel uses {extras[0]}={unet.config[extras[0]]!r}, which difflab "
                            "does not support; difflab runs text-conditioned UNets of the Stable Diffusion 1.x / 2.x kind")
        if unet.config.out_channels != unet.config.in_channels:
            raise UserError(f"the UNet has {unet.config.in_channels} input and {unet.config.out_channels} output channels; "
                            "difflab supports UNets whose output has the input's shape (no learned variance)")
        self.unet = unet

    @property
    def in_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def sample_size(self) -> int:
        return int(self.unet.config.sample_size)

    def forward(self, x: Tensor, t: Tensor, *, context: Tensor | None = None, context_mask: Tensor | None = None,
                pooled_context: Tensor | None = None) -> Tensor:
        if context is None:
            raise UserError("a Stable Diffusion UNet needs text tokens (context); pass a prompt")
        dtype = self.unet.dtype
        out = self.unet(x.to(dtype), t, encoder_hidden_states=context.to(dtype), return_dict=False)[0]
        return out.to(x.dtype)

    def save_pretrained(self, path: Path) -> None:
        self.unet.save_pretrained(str(path))


class DiffusersVAE(nn.Module):
    """diffusers' ``AutoencoderKL`` with difflab's autoencoder interface.

    ``encode(x)`` returns diffusers' diagonal Gaussian (``.mean``, ``.sample(generator)``, ``.mode()``);
    ``decode(z)`` takes an *unscaled* latent and returns the image (about [-1, 1], not clamped) in ``z``'s dtype.
    The downsampling factor is ``2 ** (len(block_out_channels) - 1)``, as diffusers computes it.
    """

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def encode(self, x: Tensor) -> Any:
        return self.vae.encode(x.to(self.vae.dtype)).latent_dist

    def decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].to(z.dtype)

    def save_pretrained(self, path: Path) -> None:
        self.vae.save_pretrained(str(path))


def _load_module(cls_name: str, path: Path, dtype: torch.dtype) -> nn.Module:
    cls = getattr(require_diffusers(), cls_name)
    try:
        return cls.from_pretrained(str(path), torch_dtype=dtype).eval().requires_grad_(False)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load the {cls_name} in {path} ({err.__class__.__name__}: {str(err).splitlines()[0]}); "
                        "check that the folder holds its config.json and diffusion_pytorch_model.safetensors") from None


def load_unet(path: Path, dtype: torch.dtype) -> DiffusersUNet:
    """``path`` (a ``unet/`` folder) as a :class:`DiffusersUNet` with weights in ``dtype``."""
    return DiffusersUNet(_load_module("UNet2DConditionModel", path, dtype))


def load_vae(path: Path, dtype: torch.dtype) -> DiffusersVAE:
    """``path`` (a ``vae/`` folder) as a :class:`DiffusersVAE` with weights in ``dtype``."""
    return DiffusersVAE(_load_module("AutoencoderKL", path, dtype))


def load_scheduler(path: Path) -> SchedulerSpec:
    """``path`` (a ``scheduler/`` folder with ``scheduler_config.json``) as a :class:`SchedulerSpec`."""
    file = path / SCHEDULER_CONFIG
    if not file.is_file():
        raise UserError(f"{path} has no {SCHEDULER_CONFIG}; the scheduler component of a diffusers folder needs it")
    config = json.loads(file.read_text())
    name = config.get("_class_name")
    if name not in VP_SCHEDULERS:
        raise UserError(f"scheduler class {name!r} in {file} is not supported; difflab reads the configs of "
                        f"{', '.join(VP_SCHEDULERS)}")
    return SchedulerSpec.from_diffusers(config)


def save_scheduler(spec: SchedulerSpec, path: Path) -> None:
    """Write the original diffusers config of ``spec`` back to ``path/scheduler_config.json``."""
    path.mkdir(parents=True, exist_ok=True)
    (path / SCHEDULER_CONFIG).write_text(json.dumps(spec.diffusers_config, indent=2, sort_keys=True))
