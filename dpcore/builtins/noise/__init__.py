"""Built-in noise mechanisms (gaussian, bandmf)."""

from __future__ import annotations

from dpcore.hookspecs import Register, hookimpl


@hookimpl
def dpcore_register_noise_mechanisms(register: Register) -> None:
    from .bandmf import DETAILS as BANDMF_DETAILS
    from .bandmf import BandMFNoise, BandMFOptions

    register("bandmf", BandMFNoise, options=BandMFOptions, details=BANDMF_DETAILS,
             description="banded matrix-factorisation noise, correlated across steps (BandMF)")
