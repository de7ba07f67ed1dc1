"""Networks: the UNet (with class, cross-attention and pooled-text slots), the noise-aware classifier, text encoders."""

from difflab.nets.unet import UNet
from difflab.nets.unet_config import UNetConfig

__all__ = ["UNet", "UNetConfig"]
