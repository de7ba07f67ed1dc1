"""The KL autoencoder of latent diffusion with its optional patch GAN (Rombach et al. 2022, appendix G).

Per sample, with ``z = mean + std * eps`` from ``q(z | x)`` and ``x_rec = decode(z)``
(terms in :mod:`difflab.training.autoencoder_loss`):

    L_AE = |x - x_rec| + perceptual_weight * pyramid_l1(x, x_rec) + kl_weight * KL / (C H W)
           + [step >= gan_start] * disc_weight * lambda * (-mean D(x_rec))
    L_D  = [step >= gan_start] * 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec.detach())))   (hinge)

``lambda`` is the adaptive weight of Esser et al. 2021 (eq. 7). Autoencoder and discriminator are one
module and take one backward of ``L_AE + L_D``: the generator's GAN term sees D through detached
parameters and D sees ``x_rec`` detached, so each network gets exactly the gradient of its own loss, and
Adam (per parameter) matches two separate optimisers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from difflab.training.autoencoder_loss import adaptive_gan_weight, hinge_d_loss, hinge_g_loss, reconstruction_loss
from difflab.training.objectives.base import Batch, Objective


class AutoencoderWithDiscriminator(nn.Module):
    """What an autoencoder run trains: the autoencoder and, for the GAN, its patch discriminator."""

    def __init__(self, autoencoder: nn.Module, discriminator: nn.Module | None = None) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.discriminator = discriminator

    def forward(self, x: Tensor, eps: Tensor, gan: bool = False) -> dict[str, Any]:
        """Reconstruction from ``z = mean + std * eps``; with ``gan`` the discriminator's logits on
        ``x_rec`` (parameters detached: the generator's term), ``x`` and ``x_rec.detach()`` (its own loss)."""
        posterior = self.autoencoder.encode(x)
        x_rec = self.autoencoder.decode(posterior.mean + posterior.std * eps)
        out: dict[str, Any] = {"x_rec": x_rec, "posterior": posterior}
        if gan:
            frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
            out["fake_for_g"] = functional_call(self.discriminator, frozen, (x_rec,))
            out["real"] = self.discriminator(x)
            out["fake"] = self.discriminator(x_rec.detach())
        return out


class AutoencoderObjective(Objective):
    """``scale``: ``(dataset, num_images, seed)`` of the latent scaling factor stored in every export;
    ``extra``: more keys for the exported config.json."""

    name = "autoencoder"

    def __init__(self, *, kl_weight: float, perceptual_weight: float, gan_start: int | None, disc_weight: float,
                 latent_shape: tuple[int, ...], scale: tuple[Any, int, int], extra: dict[str, Any] | None = None) -> None:
        self.kl_weight, self.perceptual_weight = kl_weight, perceptual_weight
        self.gan_start, self.disc_weight = gan_start, disc_weight
        self.latent_shape = tuple(latent_shape)
        self.scale = scale
        self.extra = dict(extra or {})

    def prepare(self, batch: Batch, generator: torch.Generator) -> Batch:
        eps = torch.randn((len(batch["x"]), *self.latent_shape), generator=generator)
        return {"x": batch["x"], "eps": eps, "step": batch["step"]}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        x = batch["x"]
        gan = self.gan_start is not None and batch["step"] >= self.gan_start
        out = model(x, batch["eps"], gan)
        terms = reconstruction_loss(x, out["x_rec"], self.perceptual_weight)
        rec = terms["l1"] + self.perceptual_weight * terms["perceptual"]
        kl = out["posterior"].kl()
        ae_loss = rec + self.kl_weight * kl / x[0].numel()
        terms["kl"] = kl.detach()
        total = ae_loss
        if gan:
            g_loss = hinge_g_loss(out["fake_for_g"])
            last_layer = getattr(model, "module", model).autoencoder.decoder.last_layer
            weight = adaptive_gan_weight(rec.mean(), g_loss.mean(), last_layer)
            ae_loss = ae_loss + self.disc_weight * weight * g_loss
            d_loss = hinge_d_loss(out["real"], out["fake"])
            total = ae_loss + d_loss
            terms.update(g_loss=g_loss.detach(), gan_weight=weight.expand(len(x)), d_loss=d_loss.detach())
        terms["ae_loss"] = ae_loss.detach()
        return total, {k: v.detach() for k, v in terms.items()}

    def export_extra(self) -> dict[str, Any]:
        return self.extra

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """The autoencoder alone (not the discriminator), with the scaling factor of its latents."""
        from difflab.training.autoencoder import latent_scaling_factor

        autoencoder = model.autoencoder
        autoencoder.scaling_factor = latent_scaling_factor(autoencoder, *self.scale)
        autoencoder.save_pretrained(out_dir, self.export_extra())
