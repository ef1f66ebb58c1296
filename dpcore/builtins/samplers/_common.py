"""Resumable epochs shared by the built-in samplers.

A sampler's state is the generator state at the start of the current epoch, the
epoch number and the position (batches already handed out in this epoch). On
resume the epoch is replayed from its start and the first ``position`` batches
are drawn and dropped, so the remaining batches are exactly those of the
uninterrupted run. (The data loader replaces ``position`` with the number of
batches it actually delivered, which can be fewer than the sampler produced when
workers prefetch.)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch


class ResumableEpochs:
    """Base class: subclasses implement :meth:`_epoch` (all batches of one epoch, lazily)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self.epoch = 0
        self.position = 0
        self._epoch_start = generator.get_state()

    def _epoch(self) -> Iterator[list[int]]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[int]]:
        skip = self.position
        if skip:
            self.generator.set_state(self._epoch_start)
        else:
            self._epoch_start = self.generator.get_state()
        for i, batch in enumerate(self._epoch()):
            if i < skip:
                continue
            self.position = i + 1
            yield batch
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        start = self._epoch_start if self.position else self.generator.get_state()
        return {"generator": start.clone(), "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._epoch_start = state["generator"].clone()
        self.generator.set_state(self._epoch_start)
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
