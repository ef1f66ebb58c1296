"""Built-in samplers (poisson, distributed_poisson, cyclic_poisson, shuffle)."""

from __future__ import annotations

from dpcore.hookspecs import Register, hookimpl


@hookimpl
def dpcore_register_samplers(register: Register) -> None:
    pass
