"""``poisson``: every example is in each batch independently with probability q.

This is the sampling the accountant's "Poisson-subsampled Gaussian" event
assumes; batch sizes vary (Binomial(N, q)) and a batch can be empty. With
several ranks, rank r considers the indices ``range(r, N, world_size)`` and
includes each with probability q, so the union over ranks is one Poisson
sample of the whole data set at rate q.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field

from dpcore.errors import ConfigError

from ._common import ResumableEpochs


class PoissonOptions(BaseModel):
    """Options of the ``poisson`` sampler."""

    model_config = ConfigDict(extra="forbid")

    steps_per_epoch: int | None = Field(
        default=None, gt=0, description="batches per epoch; default round(1 / sample_rate)"
    )


class PoissonSampler(ResumableEpochs):
    """Independent inclusion of each example with probability ``sample_rate``."""

    min_separation = 1
    dp_exact = True

    def __init__(
        self,
        *,
        num_samples: int,
        sample_rate: float,
        generator: torch.Generator,
        rank: int = 0,
        world_size: int = 1,
        steps_per_epoch: int | None = None,
    ) -> None:
        if not 0 < sample_rate <= 1:
            raise ConfigError(f"poisson sampler: sample_rate must be in (0, 1], got {sample_rate}")
        if num_samples <= 0:
            raise ConfigError("poisson sampler: the data set is empty")
        if not 0 <= rank < world_size:
            raise ConfigError(f"poisson sampler: rank {rank} is not in [0, {world_size})")
        super().__init__(generator)
        self.num_samples = num_samples
        self.sample_rate = float(sample_rate)
        self.steps_per_epoch = steps_per_epoch or max(1, round(1 / self.sample_rate))
        self.expected_batch_size = self.sample_rate * num_samples
        self._indices = torch.arange(rank, num_samples, world_size)
        # [distributed owner] in one process its draws are distributed_poisson's, whose
        # global batches do not depend on the world size: a checkpoint re-shards exactly
        self.world_size_independent = world_size == 1

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _epoch(self) -> Iterator[list[int]]:
        for _ in range(self.steps_per_epoch):
            # [distributed owner] one uniform per example of the whole data set, of which
            # this rank keeps its shard's: inclusions stay independent even if ranks end up
            # sharing a stream (e.g. all resumed from rank 0's state); same draws when W=1
            keep = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield self._indices[keep[self._indices]].tolist()
