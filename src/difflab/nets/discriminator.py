"""A patch discriminator (PatchGAN, Isola et al. 2017), as used to train autoencoders by Esser et al. 2021.

Stride-2 4x4 convolutions with LeakyReLU(0.2), then two stride-1 4x4 convolutions, end in a map of
logits, one per overlapping image patch. Differences from the usual network, and why: GroupNorm instead
of BatchNorm, so that a sample's logits do not depend on the rest of its batch and train/eval behave the
same; the number of stride-2 layers shrinks for small images so that the logit map keeps >= 1 pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from difflab.errors import UserError
from difflab.io.configs import JsonConfig
from difflab.io.model_folder import PretrainedModel
from difflab.io.registry import register_network
from difflab.nets.blocks import group_norm

MIN_RESOLUTION = 8


def patch_layers(resolution: int, max_layers: int = 3) -> int:
    """Stride-2 layers for ``resolution``: the most (<= ``max_layers``) leaving a logit map >= 1 pixel.

    After ``n`` stride-2 layers and two 4x4 stride-1 layers (padding 1) a side ``s`` becomes
    ``s / 2**n - 2``, so ``n <= log2(s / 3)``.
    """
    if resolution < MIN_RESOLUTION:
        raise UserError(f"the GAN discriminator needs images of at least {MIN_RESOLUTION} pixels, got {resolution}; "
                        "train without --gan-start or use a larger --resolution")
    return max(1, min(max_layers, math.floor(math.log2(resolution / 3))))


@dataclass
class PatchDiscriminatorConfig(JsonConfig):
    """Shape of a :class:`PatchDiscriminator` (``resolution``: the image side it is built for)."""

    in_channels: int = 3
    resolution: int = 32
    base_channels: int = 64
    max_layers: int = 3
    norm_groups: int = 32


@register_network
class PatchDiscriminator(PretrainedModel, nn.Module):
    """``D(x) -> (B, 1, h, w)`` logits of "real" for overlapping patches of ``x`` ``(B, C, H, W)``.

    Built from a :class:`PatchDiscriminatorConfig` or, as before, ``PatchDiscriminator(in_channels, resolution, ...)``.
    """

    config_class = PatchDiscriminatorConfig
    description = "a patch discriminator"

    def __init__(self, in_channels: PatchDiscriminatorConfig | int, resolution: int | None = None,
                 base_channels: int = 64, max_layers: int = 3, norm_groups: int = 32) -> None:
        super().__init__()
        config = in_channels
        if not isinstance(config, PatchDiscriminatorConfig):
            if resolution is None:
                raise UserError("PatchDiscriminator needs the image resolution: PatchDiscriminator(in_channels, resolution)")
            config = PatchDiscriminatorConfig(int(in_channels), resolution, base_channels, max_layers, norm_groups)
        self.config = c = config
        in_channels, base_channels, norm_groups = c.in_channels, c.base_channels, c.norm_groups
        n = patch_layers(c.resolution, c.max_layers)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = base_channels
        for i in range(1, n + 1):
            out = base_channels * min(2 ** i, 8)
            stride = 2 if i < n else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), group_norm(out, norm_groups), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # DCGAN initialisation (Radford et al. 2016), as in Isola et al. 2017
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
