"""scikit-learn's handwritten digits: 1797 greyscale 8x8 images, labels 0..9, bundled offline.

The data ships inside scikit-learn (``sklearn.datasets.load_digits``; UCI "Optical Recognition of
Handwritten Digits", Alpaydin & Kaynak 1998), so it needs no download. Pixel values 0..16 count
ink and map linearly to [-1, 1] (ink bright, as in MNIST).

Default resolution 16: an exact 2x upscale of the 8x8 originals (no information lost or invented
beyond bilinear smoothing), small enough to train on a CPU in minutes, and divisible by 4 so a
UNet can downsample twice (16 -> 8 -> 4).
"""

from __future__ import annotations

import numpy as np

from difflab.data.base import ArrayDataset, check_num_images
from difflab.data.transforms import check_size, resize_array

DIGITS_MAX_VALUE = 16.0
DEFAULT_RESOLUTION = 16


class DigitsDataset(ArrayDataset):
    """The 1797 scikit-learn digits, bilinearly resized to ``resolution`` (1 channel).

    Items carry ``label`` 0..9 and the caption "a handwritten digit N".
    """

    def __init__(self, resolution: int | tuple[int, int] = DEFAULT_RESOLUTION, num_images: int | None = None) -> None:
        from sklearn.datasets import load_digits  # deferred: sklearn import takes ~1 s

        resolution = check_size(resolution)
        bunch = load_digits()
        n = check_num_images(num_images, len(bunch.target), "scikit-learn digits")
        raw = bunch.images[:n, :, :, None].astype(np.float32)  # (N, 8, 8, 1), values 0..16
        super().__init__(
            resize_array(raw, resolution, value_range=DIGITS_MAX_VALUE),
            labels=bunch.target[:n],
            class_names=[str(d) for d in range(10)],
            caption_template="a handwritten digit {name}",
        )
