"""Built-in clippers (flat, per_layer, adaptive, automatic)."""

from __future__ import annotations

from dpcore.hookspecs import Register, hookimpl


@hookimpl
def dpcore_register_clippers(register: Register) -> None:
    pass
