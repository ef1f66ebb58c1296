"""The model wrapper returned by ``make_private``: it behaves like the user's model.

Unknown attributes and methods are looked up on the wrapped model, and
``state_dict()`` / ``load_state_dict()`` / ``named_parameters()`` use the wrapped
model's names (no ``_module.`` prefix), so checkpoints move freely between the
private and the plain model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn


class PrivateModule(nn.Module):
    """Wraps a model that a grad sampler is attached to; ``._module`` is the model."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "_module" in modules:
                return getattr(modules["_module"], name)
            raise

    # containers (nn.Sequential, nn.ModuleList, ...) index and iterate as before
    def __getitem__(self, index: Any) -> Any:
        return self._module[index]  # type: ignore[index]

    def __len__(self) -> int:
        return len(self._module)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._module)  # type: ignore[call-overload]

    # isinstance(private, GPT2LMHeadModel) holds as for the model (isinstance consults
    # __class__ after type(); type(private) and isinstance(private, PrivateModule) are
    # unchanged), so library code that checks the model's class keeps working.
    @property  # type: ignore[misc]
    def __class__(self) -> type:  # type: ignore[override]
        return type(self.__dict__["_modules"]["_module"])

    def unwrap(self) -> nn.Module:
        """The user's model."""
        return self._module

    # -- the wrapped model's names ---------------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self._module.state_dict(*args, **kwargs)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:  # type: ignore[override]
        return self._module.load_state_dict(state_dict, strict=strict, assign=assign)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:  # type: ignore[override]
        return self._module.named_parameters(prefix, recurse, remove_duplicate)

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Any]]:  # type: ignore[override]
        return self._module.named_buffers(prefix, recurse, remove_duplicate)

    def __repr__(self) -> str:
        return f"PrivateModule({self._module!r})"
