"""Built-in grad samplers (hooks, functorch, ew, ghost, bk)."""

from __future__ import annotations

from dpcore.hookspecs import Register, hookimpl


@hookimpl
def dpcore_register_grad_samplers(register: Register) -> None:
    pass
