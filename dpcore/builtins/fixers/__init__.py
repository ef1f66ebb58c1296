"""Built-in module fixers used by ModuleValidator.fix."""

from __future__ import annotations

from dpcore.hookspecs import Register, hookimpl


@hookimpl
def dpcore_register_module_fixers(register: Register) -> None:
    pass
