"""``automatic``: per-sample normalisation (Bu et al., 2022, "Automatic clipping").

Instead of ``min(1, C/‖g‖)`` every sample is scaled to just under norm C:
``c_i = C / (‖g_i‖ + γ)``. No sample's contribution exceeds C, so the sensitivity
stays C, and the learning rate no longer interacts with the choice of C. The
stability constant γ keeps small gradients from being blown up to norm C.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from ._common import single_bound, total_norms


class AutomaticOptions(BaseModel):
    """Options of the ``automatic`` clipper."""

    model_config = ConfigDict(extra="forbid")

    stability: float = Field(default=0.01, gt=0, description="γ in C / (‖g‖ + γ)")


class AutomaticClipper:
    """c_i = C / (‖g_i‖ + γ); sensitivity C."""

    #: clip factors are a fixed sequence of kernels (see dpcore.graphs)
    graph_safe = True

    def __init__(
        self,
        *,
        max_grad_norm: float | Sequence[float],
        parameter_names: Sequence[str],
        stability: float = 0.01,
    ) -> None:
        self.max_grad_norm = single_bound(max_grad_norm, "automatic")
        self.stability = float(stability)
        self.parameter_names = list(parameter_names)

    def clip_factors(self, sq_norms: Mapping[str, Tensor]) -> dict[str, Tensor]:
        factor = self.max_grad_norm / (total_norms(sq_norms) + self.stability)
        return {name: factor for name in sq_norms}

    def sensitivity(self) -> float:
        return self.max_grad_norm

    def gradient_noise_multiplier(self, noise_multiplier: float) -> float:
        return noise_multiplier

    def end_step(self, *, expected_batch_size: float, generator: Any) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"max_grad_norm": self.max_grad_norm, "stability": self.stability}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.max_grad_norm = float(state["max_grad_norm"])
        self.stability = float(state["stability"])
