"""``gaussian``: independent N(0, std²) noise on every coordinate, every step.

Draws go through :func:`dpcore.rng.standard_normal`, one call per parameter in
the order of the gradient dict, so a run is reproducible from its seed (and other
mechanisms can be bit-identical to this one). ``secure=True`` draws from the
operating system's cryptographic source instead of the seeded generator.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from dpcore import rng

#: coordinates of noise drawn before they are added (bounds the extra memory)
_CHUNK_NUMEL = 1 << 24


def _scaled_add(targets: list[Tensor], draws: list[Tensor], std: float) -> None:
    """``g += std * z`` for every pair, in one pass over the memory."""
    torch._foreach_add_(targets, draws, alpha=std)


class GaussianOptions(BaseModel):
    """Options of the ``gaussian`` noise mechanism."""

    model_config = ConfigDict(extra="forbid")

    secure: bool = Field(
        default=False,
        description="draw from the OS's cryptographic source (slower; not reproducible)",
    )


class GaussianNoise:
    """Adds i.i.d. N(0, std²) noise to each coordinate of the clipped sum."""

    min_separation = 1

    def __init__(self, *, secure: bool = False) -> None:
        self.secure = bool(secure)

    @property
    def graph_safe(self) -> bool:
        """Seeded draws on the device can be replayed from a CUDA graph (dpcore.graphs);
        the OS's source cannot."""
        return not self.secure

    def add_noise(
        self, grads: dict[str, Tensor], *, std: float, generator: torch.Generator | None
    ) -> None:
        # the draws stay one call per parameter in dict order (the contract that makes
        # seeded runs reproducible and bandmf with one band identical); the scaling and
        # the addition are one foreach launch per chunk of parameters (launch overhead
        # bounds small models), the arithmetic of g.add_(z, alpha=std). Chunks bound the
        # memory the pending draws take.
        targets: list[Tensor] = []
        draws: list[Tensor] = []
        pending = 0
        for g in grads.values():
            z = rng.standard_normal(
                g.shape, generator=generator, device=g.device, secure=self.secure
            )
            if g.dtype != z.dtype:  # low-precision sums: the plain per-parameter formula
                g.add_(z.to(dtype=g.dtype), alpha=std)
                continue
            targets.append(g)
            draws.append(z)
            pending += g.numel()
            if pending >= _CHUNK_NUMEL:
                _scaled_add(targets, draws, std)
                targets, draws, pending = [], [], 0
        if targets:
            _scaled_add(targets, draws, std)

    def state_dict(self) -> dict[str, Any]:
        return {"secure": self.secure}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass  # stateless: randomness lives in the engine's generator
