"""Built-in noise mechanisms (gaussian, bandmf)."""

from __future__ import annotations

from dpcore.hookspecs import Register, hookimpl


@hookimpl
def dpcore_register_noise_mechanisms(register: Register) -> None:
    pass
