"""Samplers for the building blocks of :mod:`dpcore.layers` (registered as they land)."""

from __future__ import annotations

from dpcore.hookspecs import Register


def register_dp_layers(register: Register) -> None:
    pass
