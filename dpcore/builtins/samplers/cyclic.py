"""``cyclic_poisson``: Poisson sampling from one of k fixed groups, in turn.

The ``N`` examples are split once into ``k`` groups by a fixed random partition
(seeded by ``partition_seed``; it is data-independent, so it need not be
secret). Step ``t`` (counted over the whole run) samples group ``t mod k``,
including each member independently with probability ``p = q k`` where ``q`` is
the configured rate, so the expected batch is ``q N`` as with ``poisson``. An
example can only participate in steps ``k`` apart, which is what banded
(``bandmf``) noise with at most ``k`` bands needs; the engine then accounts one
Poisson-subsampled Gaussian event at rate ``p`` every ``k`` steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field

from dpcore.errors import CheckpointError, ConfigError, DistributedError

DETAILS = (
    "cycle_length defaults to the noise mechanism's min_separation (its bands) when the "
    "engine creates the sampler, and to 1 (plain Poisson) when used on its own. Accounted "
    "rate: cycle_length x the configured rate (must be <= 1). Distributed: rank r samples "
    "among indices r, r + W, ... of the active group, so the union over ranks is one "
    "cyclic Poisson sample, drawn from one stream shared by all ranks (as distributed_poisson)."
)


class CyclicPoissonOptions(BaseModel):
    """Options of the ``cyclic_poisson`` sampler."""

    model_config = ConfigDict(extra="forbid")

    cycle_length: int | None = Field(
        default=None,
        ge=1,
        description="number of groups k (steps between two participations of one example); "
        "default: the noise mechanism's bands",
    )
    partition_seed: int = Field(
        default=0, description="seed of the fixed partition into groups (public, not secret)"
    )


class CyclicPoissonSampler:
    """Cyclic Poisson sampling: group ``step mod k``, each member with probability ``q k``."""

    dp_exact = True
    #: the global batches do not depend on the world size (checkpoints re-shard exactly)
    world_size_independent = True

    def __init__(
        self,
        *,
        num_samples: int,
        sample_rate: float,
        generator: torch.Generator,
        rank: int = 0,
        world_size: int = 1,
        cycle_length: int | None = None,
        partition_seed: int = 0,
    ) -> None:
        if num_samples < 1:
            raise ConfigError(f"cyclic_poisson needs a non-empty data set, got {num_samples}")
        if not 0 < sample_rate <= 1:
            raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DistributedError(f"invalid rank {rank} for world size {world_size}")
        self.num_samples = num_samples
        self.batch_rate = float(sample_rate)  # expected batch / N, as configured
        self.generator = generator
        self.rank = rank
        self.world_size = world_size
        self.partition_seed = partition_seed
        self._explicit = cycle_length is not None
        self._cycle_length = int(cycle_length) if cycle_length is not None else 1
        self.epoch = 0
        self.position = 0  # batches drawn in this epoch
        self._first_step = 0  # run-wide index of this epoch's first step
        self._groups: list[torch.Tensor] | None = None
        self._check_rate()
        self._share_stream()
        # The state is (generator at the start of the epoch, position): the form a data
        # loader that snapshots at the epoch start and counts delivered batches also writes.
        self._epoch_start = self.generator.get_state()
        self._replay = 0  # batches to redraw after loading a state

    def _share_stream(self) -> None:
        # Like distributed_poisson: every rank draws from rank 0's stream and keeps its own
        # slice, so rank 0's checkpoint restores all ranks and the global batches do not
        # depend on the world size.
        if self.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise DistributedError(
                f"cyclic_poisson was built for rank {self.rank} of {self.world_size}, "
                f"but this process is rank {dist.get_rank()} of {dist.get_world_size()}"
            )
        from dpcore.distributed import broadcast_object

        self.generator.set_state(broadcast_object(self.generator.get_state(), src=0))

    # -- the cycle ------------------------------------------------------------------
    @property
    def cycle_length(self) -> int:
        return self._cycle_length

    @property
    def min_separation(self) -> int:
        return self._cycle_length

    @property
    def sample_rate(self) -> float:
        """Per-group inclusion probability ``p = q k``: the rate the accountant sees."""
        return self.batch_rate * self._cycle_length

    def require_separation(self, min_separation: int) -> None:
        """Adopt the noise mechanism's separation when ``cycle_length`` was not set.

        Called by the engine with ``noise.min_separation`` before training. An explicit
        ``cycle_length`` is left alone (the engine refuses it if it is too short).
        """
        if self._explicit or min_separation == self._cycle_length:
            return
        if self.step > 0 or self.epoch > 0:
            raise ConfigError("cyclic_poisson: the cycle length cannot change once sampling began")
        self._cycle_length = int(min_separation)
        self._groups = None
        self._check_rate()

    def _check_rate(self) -> None:
        if self.sample_rate > 1:
            raise ConfigError(
                f"cyclic_poisson: cycle_length {self._cycle_length} x sample rate "
                f"{self.batch_rate:.6g} = {self.sample_rate:.6g} > 1, so a group of "
                f"~{self.num_samples // self._cycle_length} examples cannot supply the expected "
                "batch; use fewer bands (and a shorter cycle) or a smaller batch size"
            )

    def group_of(self) -> torch.Tensor:
        """Group of every index (int64, length N): the fixed, seeded partition."""
        gen = torch.Generator().manual_seed(self.partition_seed)
        perm = torch.randperm(self.num_samples, generator=gen)
        groups = torch.empty(self.num_samples, dtype=torch.int64)
        groups[perm] = torch.arange(self.num_samples) % self._cycle_length
        return groups

    def _members(self) -> list[torch.Tensor]:
        """Sorted indices of each group (all ranks)."""
        if self._groups is None:
            group_of = self.group_of()
            self._groups = [(group_of == g).nonzero().flatten() for g in range(self._cycle_length)]
        return self._groups

    @property
    def expected_batch_size(self) -> float:
        """Global expected batch size ``q N`` (over all ranks)."""
        return self.batch_rate * self.num_samples

    # -- sampling -------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Run-wide index of the next step (its group is ``step mod cycle_length``)."""
        return self._first_step + self.position

    def __len__(self) -> int:
        return max(1, round(1 / self.batch_rate))

    def _draw(self, step: int) -> list[int]:
        group = self._members()[step % self._cycle_length]
        chosen = group[torch.rand(len(group), generator=self.generator) < self.sample_rate]
        return chosen[chosen % self.world_size == self.rank].tolist()

    def _next_epoch(self) -> None:
        self._first_step += len(self)
        self.epoch += 1
        self.position = 0
        self._epoch_start = self.generator.get_state()

    def __iter__(self) -> Iterator[list[int]]:
        if self._replay:  # after load_state_dict: redraw this epoch's first batches
            self.generator.set_state(self._epoch_start)
            for step in range(self._first_step, self._first_step + self._replay):
                self._draw(step)
            self._replay = 0
        if self.position >= len(self):
            self._next_epoch()
        while self.position < len(self):
            batch = self._draw(self.step)
            self.position += 1
            yield batch
        self._next_epoch()

    # -- state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self._epoch_start.clone(),
            "epoch": self.epoch,
            "position": self.position,
            "first_step": self._first_step,
            "cycle_length": self._cycle_length,
            "partition_seed": self.partition_seed,
            "num_samples": self.num_samples,
            "world_size": self.world_size,  # informative: the global batches do not depend on it
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("cycle_length", "partition_seed", "num_samples"):
            if int(state[key]) != getattr(self, key):
                raise CheckpointError(
                    f"cyclic_poisson: the checkpoint has {key} = {state[key]} but this run "
                    f"has {getattr(self, key)}; resume with the same data set and sampler "
                    "options (otherwise examples could participate closer than the cycle)"
                )
        self._epoch_start = state["generator"].clone()
        self.generator.set_state(self._epoch_start)
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._first_step = int(state["first_step"])
        self._replay = self.position
