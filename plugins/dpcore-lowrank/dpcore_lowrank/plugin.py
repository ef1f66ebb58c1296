"""The ``lowrank`` entry point of the ``dpcore`` group: registers the layer grad sampler."""

from __future__ import annotations

from dpcore.hookspecs import Register, hookimpl

from .layer import LowRankLinear
from .sampler import LowRankGradSampler


@hookimpl
def dpcore_register_layer_grad_samplers(register: Register) -> None:
    register(
        LowRankLinear,
        LowRankGradSampler(),
        description="LoRA-style low-rank linear (dpcore-lowrank); ghost norms",
    )
