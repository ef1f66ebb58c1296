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

    def add_noise(
        self, grads: dict[str, Tensor], *, std: float, generator: torch.Generator | None
    ) -> None:
        for g in grads.values():
            z = rng.standard_normal(
                g.shape, generator=generator, device=g.device, secure=self.secure
            )
            g.add_(z.to(dtype=g.dtype) * std)

    def state_dict(self) -> dict[str, Any]:
        return {"secure": self.secure}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass  # stateless: randomness lives in the engine's generator
