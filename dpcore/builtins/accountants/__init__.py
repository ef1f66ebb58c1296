"""Built-in accountants: ``rdp``, ``gdp`` and ``prv``.

Each lives in its own module; this package only registers them (it is the
``builtin_accountants`` entry point of the ``dpcore`` group).
"""

from __future__ import annotations

from dpcore.hookspecs import Register, hookimpl


@hookimpl
def dpcore_register_accountants(register: Register) -> None:
    from .gdp import GDPAccountant, GDPOptions
    from .prv import PRVAccountant, PRVOptions
    from .rdp import RDPAccountant, RDPOptions

    register(
        "prv",
        PRVAccountant,
        options=PRVOptions,
        description="privacy random variables composed by FFT: near-exact epsilon, certified upper bound",
        details="Both neighbouring directions of the Poisson-subsampled Gaussian; "
        "get_epsilon_bounds(delta) gives lower/estimate/upper. Handles changing sigma and q.",
    )
    register(
        "rdp",
        RDPAccountant,
        options=RDPOptions,
        description="Rényi DP of the subsampled Gaussian (exact orders), optimal-order conversion",
        details="A valid but looser upper bound than prv; get_privacy_spent(delta) also "
        "returns the best order.",
    )
    register(
        "gdp",
        GDPAccountant,
        options=GDPOptions,
        description="Gaussian DP via the central limit theorem: fast approximation, identical steps only",
        details="Not a certified bound: can understate epsilon with few steps or large q.",
    )
