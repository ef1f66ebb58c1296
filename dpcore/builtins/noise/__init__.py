"""Built-in noise mechanisms (gaussian, bandmf)."""

from __future__ import annotations

from dpcore.hookspecs import Register, hookimpl


@hookimpl
def dpcore_register_noise_mechanisms(register: Register) -> None:
    from .gaussian import GaussianNoise, GaussianOptions

    register(
        "gaussian",
        GaussianNoise,
        options=GaussianOptions,
        description="independent Gaussian noise each step (secure=true: OS cryptographic source)",
    )
    from .bandmf import DETAILS as BANDMF_DETAILS
    from .bandmf import BandMFNoise, BandMFOptions

    register(
        "bandmf",
        BandMFNoise,
        options=BandMFOptions,
        details=BANDMF_DETAILS,
        description="banded matrix-factorisation noise, correlated across steps (BandMF)",
    )
