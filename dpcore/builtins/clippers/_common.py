"""Shared helpers of the built-in clippers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from dpcore.errors import ConfigError

#: added to norms before dividing, so a zero gradient gets a finite factor
EPS = 1e-6


def single_bound(max_grad_norm: float | Sequence[float], clipper: str) -> float:
    """The one clipping bound of a clipper that takes a scalar."""
    if isinstance(max_grad_norm, (int, float)):
        bound = float(max_grad_norm)
    else:
        values = list(max_grad_norm)
        if len(values) != 1:
            raise ConfigError(
                f"the {clipper!r} clipper takes one max_grad_norm, got a list of {len(values)}; "
                "use clipping='per_layer' for one bound per parameter or group."
            )
        bound = float(values[0])
    if not bound > 0:
        raise ConfigError(f"max_grad_norm must be positive, got {bound}")
    return bound


def total_norms(sq_norms: Mapping[str, Tensor]) -> Tensor:
    """Per-sample L2 norm over all parameters (float32, shape [B])."""
    values = list(sq_norms.values())
    if not values:
        return torch.zeros(0)
    device = values[0].device
    # one stacked reduction instead of a chain of additions (one launch, not one per
    # parameter: small models are bound by launch overhead)
    rows = [
        v if v.dtype == torch.float32 and v.device == device else v.to(device, torch.float32)
        for v in values
    ]
    total = rows[0] if len(rows) == 1 else torch.stack(rows).sum(0)
    return total.clamp_min(0).sqrt()
