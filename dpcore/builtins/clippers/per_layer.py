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

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from dpcore.errors import ConfigError

from ._common import EPS, total_norms


def _as_float32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


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
        #: the bounds as a device tensor for the one-group-per-parameter fast path
        self._bounds_cache: tuple[Any, Tensor] | None = None

    def clip_factors(self, sq_norms: Mapping[str, Tensor]) -> dict[str, Tensor]:
        fast = self._one_per_group(sq_norms)
        if fast is not None:
            return fast
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

    def _one_per_group(self, sq_norms: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        """Every parameter in its own group (the default): all factors in a few launches
        instead of a few per parameter, with the same arithmetic (``C / x`` is
        ``x.reciprocal() * C`` in torch). None: the general path applies."""
        names = list(sq_norms)
        groups = [self.group_of.get(n) for n in names]
        if not names or None in groups or len(set(groups)) != len(names):
            return None
        values = list(sq_norms.values())
        device, shape = values[0].device, values[0].shape
        if any(v.device != device or v.shape != shape for v in values):
            return None
        if len(self.group_of) != len(set(self.group_of.values())):
            return None  # some group has several members, absent from this pass
        rows = torch.stack([_as_float32(v) for v in values])
        bounds = self._bounds_on(device, [g for g in groups if g is not None])
        factors = ((rows.clamp_min(0).sqrt() + EPS).reciprocal() * bounds).clamp(max=1.0)
        return dict(zip(names, factors.unbind(0), strict=True))

    def _bounds_on(self, device: torch.device, groups: list[int]) -> Tensor:
        key = (device, tuple(groups), tuple(self.max_grad_norm))
        cached = self._bounds_cache
        if cached is None or cached[0] != key:
            values = [self.max_grad_norm[g] for g in groups]
            tensor = torch.tensor(values, dtype=torch.float32).to(device).unsqueeze(1)
            self._bounds_cache = (key, tensor)
            cached = self._bounds_cache
        return cached[1]

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
