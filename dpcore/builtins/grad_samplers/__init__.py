"""Built-in grad samplers: ``hooks``, ``functorch`` and ``ew`` (materialising per-sample
gradients); ``ghost`` and ``bk`` (fast clipping) register from their own modules.

Each of those modules may define ``register_grad_samplers(register)``; it is called
from the hook below, so every built-in grad sampler comes through this package's
one entry point.
"""

from __future__ import annotations

import importlib

from dpcore.hookspecs import Register, hookimpl

from ._base import MaterializingOptions


@hookimpl
def dpcore_register_grad_samplers(register: Register) -> None:
    from .ew import ew_factory
    from .functorch import functorch_factory
    from .hooks import HooksOptions, hooks_factory

    register(
        "hooks",
        hooks_factory,
        options=HooksOptions,
        description="forward/backward hooks + per-layer samplers; torch.func for other layers",
    )
    register(
        "functorch",
        functorch_factory,
        options=MaterializingOptions,
        description="whole-model torch.func (vmap over vjp); no layer samplers needed",
    )
    register(
        "ew",
        ew_factory,
        options=MaterializingOptions,
        description="PyTorch expanded weights; batch-first, non-recurrent models",
    )

    for extra in ("ghost", "bk"):
        try:
            mod = importlib.import_module(f"{__name__}.{extra}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{extra}":
                raise
            continue
        hook = getattr(mod, "register_grad_samplers", None)
        if hook is not None:
            hook(register)
