"""``flat``: one bound C on the L2 norm of each sample's whole gradient."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from ._common import EPS, single_bound, total_norms


class FlatClipper:
    """c_i = min(1, C / ‖g_i‖), the same factor for every parameter; sensitivity C."""

    #: clip factors are a fixed sequence of kernels (see dpcore.graphs)
    graph_safe = True

    def __init__(
        self, *, max_grad_norm: float | Sequence[float], parameter_names: Sequence[str]
    ) -> None:
        self.max_grad_norm = single_bound(max_grad_norm, "flat")
        self.parameter_names = list(parameter_names)

    def clip_factors(self, sq_norms: Mapping[str, Tensor]) -> dict[str, Tensor]:
        factor = (self.max_grad_norm / (total_norms(sq_norms) + EPS)).clamp(max=1.0)
        return {name: factor for name in sq_norms}

    def sensitivity(self) -> float:
        return self.max_grad_norm

    def gradient_noise_multiplier(self, noise_multiplier: float) -> float:
        return noise_multiplier

    def end_step(self, *, expected_batch_size: float, generator: Any) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"max_grad_norm": self.max_grad_norm}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.max_grad_norm = float(state["max_grad_norm"])
