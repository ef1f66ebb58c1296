"""Hook specifications of the ``dpcore`` entry-point group.

A plugin module implements any of these hooks; each receives a ``register``
callable. Built-ins and third-party packages register the same way::

    from dpcore.hookspecs import hookimpl

    @hookimpl
    def dpcore_register_accountants(register):
        register("my_accountant", MyAccountant, options=MyOptions,
                 description="one line shown by `dpcore list-plugins`")

For layer grad samplers the first argument is the ``nn.Module`` type::

    @hookimpl
    def dpcore_register_layer_grad_samplers(register):
        register(MyLayer, MyLayerGradSampler(), description="...")

``options`` is a pydantic model (use ``extra="forbid"``) whose fields become the
plugin's configuration keys; the factory is called as
``factory(**runtime_arguments, **options)`` (see :mod:`dpcore.protocols`).
"""

from __future__ import annotations

from typing import Any, Protocol

import pluggy

PROJECT = "dpcore"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Register(Protocol):
    def __call__(
        self,
        name: Any,
        obj: Any,
        *,
        options: Any = None,
        description: str = "",
        details: str = "",
    ) -> None: ...


@hookspec
def dpcore_register_grad_samplers(register: Register) -> None:
    """Register :class:`~dpcore.protocols.GradSampler` factories by name."""


@hookspec
def dpcore_register_layer_grad_samplers(register: Register) -> None:
    """Register :class:`~dpcore.protocols.LayerGradSampler` instances by module type."""


@hookspec
def dpcore_register_clippers(register: Register) -> None:
    """Register :class:`~dpcore.protocols.Clipper` factories by name."""


@hookspec
def dpcore_register_noise_mechanisms(register: Register) -> None:
    """Register :class:`~dpcore.protocols.NoiseMechanism` factories by name."""


@hookspec
def dpcore_register_samplers(register: Register) -> None:
    """Register :class:`~dpcore.protocols.Sampler` factories by name."""


@hookspec
def dpcore_register_accountants(register: Register) -> None:
    """Register :class:`~dpcore.protocols.Accountant` factories by name."""


@hookspec
def dpcore_register_module_fixers(register: Register) -> None:
    """Register :class:`~dpcore.protocols.ModuleFixer` instances by name."""


#: hook name for each plugin kind
HOOK_FOR_KIND: dict[str, str] = {
    "grad_sampler": "dpcore_register_grad_samplers",
    "layer_grad_sampler": "dpcore_register_layer_grad_samplers",
    "clipper": "dpcore_register_clippers",
    "noise": "dpcore_register_noise_mechanisms",
    "sampler": "dpcore_register_samplers",
    "accountant": "dpcore_register_accountants",
    "module_fixer": "dpcore_register_module_fixers",
}
