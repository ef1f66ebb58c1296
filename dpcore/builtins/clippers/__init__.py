"""Built-in clippers (flat, per_layer, adaptive, automatic)."""

from __future__ import annotations

from dpcore.hookspecs import Register, hookimpl


@hookimpl
def dpcore_register_clippers(register: Register) -> None:
    from .adaptive import AdaptiveClipper, AdaptiveOptions
    from .automatic import AutomaticClipper, AutomaticOptions
    from .flat import FlatClipper
    from .per_layer import PerLayerClipper, PerLayerOptions

    register("flat", FlatClipper, description="one bound C on each sample's whole gradient")
    register(
        "per_layer",
        PerLayerClipper,
        options=PerLayerOptions,
        description="a bound per parameter or group; sensitivity sqrt(Σ C_g²)",
    )
    register(
        "adaptive",
        AdaptiveClipper,
        options=AdaptiveOptions,
        description="bound tracks a quantile of the norms via a privatised count (Andrew et al. 2021)",
    )
    register(
        "automatic",
        AutomaticClipper,
        options=AutomaticOptions,
        description="per-sample normalisation C/(‖g‖+γ) (Bu et al. 2022)",
    )
