"""The space a denoiser's samples live in: how noise is drawn, projected, and how many dimensions count.

A :class:`Space` is owned by the :class:`~difflab.denoiser.Denoiser` (``denoiser.space``). The default is
all of R^D: :meth:`Space.noise` is N(0, I), :meth:`Space.project` the identity and :meth:`Space.num_dims`
the number of entries per sample. Subclasses restrict it, e.g. to the zero centre-of-mass subspace of a
molecule (Hoogeboom et al. 2022, sec. 3.2), by overriding :meth:`project` (and :meth:`num_dims` when the
subspace has fewer degrees of freedom).

Mask convention (the ``"mask"`` of a collated batch, :mod:`difflab.data.collate`): ``mask`` has shape
``(B, *prefix)``, aligned with the leading axes of ``x`` of shape ``(B, *prefix, *rest)``, with 1 on real
entries and 0 on padding; it broadcasts over the trailing axes ``rest``. A point cloud ``x (B, N, 3)`` has
``mask (B, N)``; a channel-first waveform ``x (B, C, L)`` has ``mask (B, 1, L)``. ``mask=None``: every
entry is real.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from difflab.errors import UserError
from difflab.noise import NoiseSource


def expand_mask(mask: Tensor, x: Tensor) -> Tensor:
    """``mask`` (B, *prefix) with trailing singleton axes appended, so that it broadcasts against ``x``."""
    if mask.ndim > x.ndim or mask.shape[0] != x.shape[0]:
        raise UserError(f"mask of shape {tuple(mask.shape)} does not fit x of shape {tuple(x.shape)}; "
                        "it must be (B, *leading axes of x) with 1 on real entries and 0 on padding")
    shaped = mask.reshape(*mask.shape, *([1] * (x.ndim - mask.ndim)))
    try:
        torch.broadcast_shapes(shaped.shape, x.shape)
    except RuntimeError:
        raise UserError(f"mask of shape {tuple(mask.shape)} does not broadcast against x of shape {tuple(x.shape)}; "
                        "align it with x's leading axes (size 1 to broadcast, e.g. (B, 1, L) for x of shape (B, C, L))") from None
    return shaped.to(device=x.device, dtype=x.dtype)


class Space:
    """R^D with N(0, I) noise: the default space of every denoiser (module docstring)."""

    def noise(
        self, shape: Sequence[int], generator: NoiseSource, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Noise of shape (B, *shape), row i from generator i (:meth:`NoiseSource.randn`), then :meth:`project`-ed."""
        return self.project(generator.randn(shape, dtype=dtype, device=device))

    def project(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Project ``x`` (B, ...) onto the space; the identity on R^D. Padded entries are left as they are."""
        return x

    def num_dims(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Real dimensions per sample (B,), float64: prod(x.shape[1:]), or the entries of x where ``mask`` is 1."""
        if mask is None:
            return torch.full((x.shape[0],), float(x[0].numel()), dtype=torch.float64, device=x.device)
        shaped = expand_mask(mask, x)
        per_entry = x[0].numel() // shaped[0].numel()  # the axes the mask broadcasts over
        return shaped.flatten(1).to(torch.float64).sum(1) * float(per_entry)

    def sum(self, values: Tensor, mask: Tensor | None = None) -> Tensor:
        """Per-sample sum (B,) of ``values`` (shaped like x) over the real entries; padding, even NaN, adds 0."""
        if mask is None:
            return values.flatten(1).sum(1)
        keep = expand_mask(mask, values).bool()
        return torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device)).flatten(1).sum(1)

    def mean(self, values: Tensor, mask: Tensor | None = None) -> Tensor:
        """Per-sample mean over the real dimensions: ``sum(mask * values) / num_dims(x, mask)``.

        Without a mask this is the plain mean over every entry (a subspace with fewer degrees of freedom
        overrides it together with :meth:`num_dims`).
        """
        if mask is None:
            return values.flatten(1).mean(1)
        return self.sum(values, mask) / self.num_dims(values, mask).to(values.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ProjectedNoise(NoiseSource):
    """A :class:`NoiseSource` whose draws are projected onto ``space``: what the samplers' stochastic steps use.

    Row i still comes from generator i only; for the default :class:`Space` the draws are bit-identical
    to ``source``'s. A space whose projection needs a mask binds it itself (samplers call ``project(x)``).
    """

    def __init__(self, source: NoiseSource, space: Space) -> None:
        self.source, self.space = source, space
        self.generators = source.generators

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
        return self.space.project(self.source.randn(shape, dtype=dtype, device=device))
