"""``per_layer``: a separate bound for each parameter (or group of parameters).

Each group's part of a sample's gradient is clipped to its own bound C_g, so a
sample's whole contribution has norm at most ``sqrt(Σ_g C_g²)``: that combined
bound is the sensitivity the noise is scaled to.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from dpcore.errors import ConfigError

from ._common import EPS, total_norms


class PerLayerOptions(BaseModel):
    """Options of the ``per_layer`` clipper."""

    model_config = ConfigDict(extra="forbid")

    groups: list[list[str]] | None = Field(
        default=None,
        description=(
            "groups of parameter-name patterns (fnmatch, e.g. ['encoder.*']) clipped together; "
            "default: one group per parameter"
        ),
    )


class PerLayerClipper:
    """c_i^g = min(1, C_g / ‖g_i^g‖) per group g; sensitivity sqrt(Σ_g C_g²).

    ``max_grad_norm`` is a list with one bound per group (per parameter by default,
    in ``module.named_parameters()`` order), or one number C that is split evenly,
    C/sqrt(G) per group, so that the sensitivity stays C.
    """

    def __init__(
        self,
        *,
        max_grad_norm: float | Sequence[float],
        parameter_names: Sequence[str],
        groups: list[list[str]] | None = None,
    ) -> None:
        names = list(parameter_names)
        self.group_of: dict[str, int] = {}
        if groups is None:
            self.group_of = {n: i for i, n in enumerate(names)}
            n_groups = len(names)
        else:
            n_groups = len(groups)
            for name in names:
                hits = [
                    i
                    for i, pats in enumerate(groups)
                    if any(fnmatch.fnmatch(name, p) for p in pats)
                ]
                if not hits:
                    raise ConfigError(
                        f"per_layer clipper: parameter {name!r} matches no group of {groups}; "
                        "add a pattern for it (e.g. ['*'] as the last group)."
                    )
                self.group_of[name] = hits[0]
        if isinstance(max_grad_norm, (int, float)):
            bounds = [float(max_grad_norm) / math.sqrt(max(n_groups, 1))] * n_groups
        else:
            bounds = [float(b) for b in max_grad_norm]
            if len(bounds) != n_groups:
                raise ConfigError(
                    f"per_layer clipper: max_grad_norm has {len(bounds)} values for {n_groups} "
                    f"groups ({'one per parameter' if groups is None else 'from the groups option'}); "
                    "give one bound per group, or a single number to split evenly."
                )
        if any(not b > 0 for b in bounds):
            raise ConfigError(f"per_layer clipper: every bound must be positive, got {bounds}")
        self.max_grad_norm = bounds
        self.parameter_names = names

    def clip_factors(self, sq_norms: Mapping[str, Tensor]) -> dict[str, Tensor]:
        by_group: dict[int, dict[str, Tensor]] = {}
        for name, sq in sq_norms.items():
            if name not in self.group_of:
                raise ConfigError(f"per_layer clipper: no bound for parameter {name!r}")
            by_group.setdefault(self.group_of[name], {})[name] = sq
        factors: dict[str, Tensor] = {}
        for g, members in by_group.items():
            factor = (self.max_grad_norm[g] / (total_norms(members) + EPS)).clamp(max=1.0)
            factors.update({name: factor for name in members})
        return factors

    def sensitivity(self) -> float:
        return math.sqrt(sum(b * b for b in self.max_grad_norm))

    def gradient_noise_multiplier(self, noise_multiplier: float) -> float:
        return noise_multiplier

    def end_step(self, *, expected_batch_size: float, generator: Any) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"max_grad_norm": list(self.max_grad_norm)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        bounds = [float(b) for b in state["max_grad_norm"]]
        if len(bounds) != len(self.max_grad_norm):
            raise ConfigError("per_layer clipper: saved bounds do not match the number of groups")
        self.max_grad_norm = bounds
