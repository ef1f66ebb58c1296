"""Built-in layer grad samplers for torch and dpcore layers."""

from __future__ import annotations

from dpcore.hookspecs import Register, hookimpl


@hookimpl
def dpcore_register_layer_grad_samplers(register: Register) -> None:
    pass
