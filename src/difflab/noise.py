"""Seeded noise: sample i depends only on its own seed, whatever the batch size (as in EDM's generate.py).

A :class:`NoiseSource` holds one ``torch.Generator`` per sample and draws each sample's noise from
its own generator, so the same seed gives the same image alone or inside any batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from difflab.errors import UserError


class NoiseSource:
    """Per-sample Gaussian noise for a batch of ``len(generators)`` samples."""

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        if len(generators) == 0:
            raise UserError("a NoiseSource needs at least one generator (one per sample)")
        self.generators = list(generators)

    @classmethod
    def from_seeds(cls, seeds: Sequence[int]) -> "NoiseSource":
        return cls([torch.Generator().manual_seed(int(s)) for s in seeds])

    @classmethod
    def from_any(
        cls, generator: "torch.Generator | Sequence[torch.Generator] | NoiseSource | None", batch: int
    ) -> "NoiseSource":
        """Accept one generator (shared, so not batch-independent), a list (one per sample), or None."""
        if isinstance(generator, NoiseSource):
            return generator
        if generator is None:
            seeds = torch.randint(0, 2**62, (batch,)).tolist()
            return cls.from_seeds(seeds)
        if isinstance(generator, torch.Generator):
            return _SharedNoise(generator, batch)
        if len(generator) != batch:
            raise UserError(f"got {len(generator)} generators for a batch of {batch}; pass one per sample")
        return cls(generator)

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
        """Noise of shape ``(B, *shape)``: row i drawn from generator i on the CPU, then moved."""
        rows = [torch.randn(tuple(shape), generator=g, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(device)

    def like(self, x: Tensor) -> Tensor:
        """Noise with the shape, dtype and device of ``x`` (one row per sample)."""
        if x.shape[0] != len(self):
            raise UserError(f"batch of {x.shape[0]} but {len(self)} noise generators")
        return self.randn(x.shape[1:], dtype=x.dtype, device=x.device)


class _SharedNoise(NoiseSource):
    """A single generator shared by the batch (diffusers' convention); not batch-size independent."""

    def __init__(self, generator: torch.Generator, batch: int) -> None:
        self.generators = [generator] * batch
        self._generator = generator

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
        return torch.randn((len(self.generators), *shape), generator=self._generator, dtype=dtype).to(device)


def seeded_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded by ``(seed, *keys)``: randomness as a pure function of e.g. (seed, purpose, step)."""
    for k in keys:
        seed = (seed * 1_000_003 + k) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)
