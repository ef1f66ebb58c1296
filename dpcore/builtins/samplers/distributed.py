"""``distributed_poisson``: each rank's shard of one Poisson sample of the whole data set.

Rank ``r`` of ``W`` considers the indices ``range(r, N, W)`` and includes each one
independently with the *global* rate ``q``, so the union over ranks is a Poisson
sample of all ``N`` examples at rate ``q`` -- the event the accountant composes.

Every step draws one uniform number per example of the *whole* data set from a
stream that all ranks share (rank 0's, broadcast at construction), and rank ``r``
keeps its slice ``[r::W]``. The cost is that of a single-process Poisson sampler,
and it buys three things:

* the state of rank 0 (the only rank that writes checkpoints) restores every rank
  exactly;
* resuming with another world size re-shards exactly: the global batches are the
  same whatever the number of ranks;
* with one rank it is an ordinary Poisson sampler, so a distributed run can be
  compared batch for batch with a single-process one.

Inclusion stays independent per example whether or not the streams are shared,
since every example has its own uniform number.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from dpcore.errors import ConfigError, DistributedError

from .poisson import PoissonOptions, PoissonSampler

#: same options as ``poisson``
DistributedPoissonOptions = PoissonOptions


class DistributedPoissonSampler(PoissonSampler):
    """Each rank's shard of a Poisson sample (global rate ``q``) of the whole data set.

    The draw rule is :class:`PoissonSampler`'s; this class only makes every rank use
    rank 0's stream, which is what lets rank 0's checkpoint restore all ranks.
    """

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
        if world_size < 1 or not 0 <= rank < world_size:
            raise DistributedError(f"invalid rank {rank} for world size {world_size}")
        _share_stream(generator, rank, world_size)
        super().__init__(
            num_samples=num_samples,
            sample_rate=sample_rate,
            generator=generator,
            rank=rank,
            world_size=world_size,
            steps_per_epoch=steps_per_epoch,
        )
        self.rank = rank
        self.world_size = world_size
        #: the global batches do not depend on the world size (checkpoints re-shard exactly)
        self.world_size_independent = True

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "num_samples": self.num_samples,
            "sample_rate": self.sample_rate,
            "steps_per_epoch": self.steps_per_epoch,
            # informative only: the global batches do not depend on it
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("num_samples", "sample_rate", "steps_per_epoch"):
            if key in state and state[key] != getattr(self, key):
                raise ConfigError(
                    f"distributed_poisson state has {key}={state[key]!r} but this sampler has "
                    f"{getattr(self, key)!r}; resume with the same data set and sample rate"
                )
        super().load_state_dict(state)


def _share_stream(generator: torch.Generator, rank: int, world_size: int) -> None:
    """Make ``generator`` rank 0's on every rank (see the module docstring).

    Only when a process group of the declared world size exists: a sampler built for
    some rank inside a single process (tests, tools) keeps the generator it was given.
    """
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise DistributedError(
            f"distributed_poisson was built for rank {rank} of {world_size}, "
            f"but this process is rank {dist.get_rank()} of {dist.get_world_size()}"
        )
    from dpcore.distributed import broadcast_object

    generator.set_state(broadcast_object(generator.get_state(), src=0))


def distributed_poisson(
    *,
    num_samples: int,
    sample_rate: float,
    generator: torch.Generator,
    rank: int = 0,
    world_size: int = 1,
    steps_per_epoch: int | None = None,
) -> DistributedPoissonSampler:
    """Each rank's shard of one Poisson sample of the whole data set at the global rate."""
    return DistributedPoissonSampler(
        num_samples=num_samples,
        sample_rate=sample_rate,
        generator=generator,
        rank=rank,
        world_size=world_size,
        steps_per_epoch=steps_per_epoch,
    )
