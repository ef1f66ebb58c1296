"""``shuffle``: fixed-size batches from a random permutation each epoch.

This is ordinary shuffled mini-batching. The accountant is told the rate
q = batch_size / N as if the batches were Poisson samples; that is an
approximation, not a guarantee (each example is used exactly once per epoch, a
different event), so the engine warns when this sampler is chosen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from dpcore.errors import ConfigError

from ._common import ResumableEpochs


class ShuffleSampler(ResumableEpochs):
    """Shuffled batches of size round(q·N) (the last one may be smaller)."""

    min_separation = 1
    dp_exact = False

    def __init__(
        self,
        *,
        num_samples: int,
        sample_rate: float,
        generator: torch.Generator,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if world_size != 1:
            raise ConfigError(
                "the shuffle sampler runs in one process only; use 'distributed_poisson' for "
                "distributed training."
            )
        if not 0 < sample_rate <= 1:
            raise ConfigError(f"shuffle sampler: sample_rate must be in (0, 1], got {sample_rate}")
        super().__init__(generator)
        self.num_samples = num_samples
        self.sample_rate = float(sample_rate)
        self.batch_size = max(1, round(sample_rate * num_samples))
        self.expected_batch_size = float(self.batch_size)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def _epoch(self) -> Iterator[list[int]]:
        order = torch.randperm(self.num_samples, generator=self.generator).tolist()
        for start in range(0, self.num_samples, self.batch_size):
            yield order[start : start + self.batch_size]
