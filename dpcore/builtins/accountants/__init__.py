"""Built-in accountants (rdp, gdp, prv)."""

from __future__ import annotations

from dpcore.hookspecs import Register, hookimpl


@hookimpl
def dpcore_register_accountants(register: Register) -> None:
    pass
