"""Typed configuration of the engine.

Each component is ``{name = "...", **options}``; the options are validated
against the chosen plugin's own options model (after plugin discovery), so a typo
in a third-party plugin's option is reported with that plugin's field names.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    create_model,
    field_validator,
    model_validator,
)

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Tables of a config file that belong to commands, not to the engine.
COMMAND_SECTIONS = ("train", "audit")

#: config field -> plugin kind
COMPONENT_KINDS: dict[str, str] = {
    "grad_sampler": "grad_sampler",
    "clipper": "clipper",
    "noise": "noise",
    "sampler": "sampler",
    "accountant": "accountant",
}


class ComponentConfig(BaseModel):
    """A plugin chosen by name, with its options: ``{name = "prv", eps_error = 0.01}``."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


def _component(name: str) -> Any:
    return Field(default_factory=lambda: ComponentConfig(name=name))


class EngineConfig(BaseModel):
    """Everything that decides the privacy guarantee and the pipeline."""

    model_config = ConfigDict(extra="forbid")

    noise_multiplier: float | None = Field(
        default=None, ge=0, description="σ; give this or target_epsilon"
    )
    target_epsilon: float | None = Field(
        default=None, gt=0, description="calibrate σ to spend this budget over `epochs`"
    )
    epochs: float | None = Field(default=None, gt=0, description="epochs the budget must cover")
    max_grad_norm: float | list[float] = Field(
        default=1.0, description="clipping bound C (a list for per-layer clipping)"
    )
    delta: float = Field(default=1e-5, gt=0, lt=1)
    seed: int | None = Field(
        default=None, description="drives sampling and noise; omit for a fresh OS-random seed"
    )
    batch_first: bool = True
    loss_reduction: Literal["mean", "sum"] = "mean"
    grad_sampler: ComponentConfig = _component("hooks")
    clipper: ComponentConfig = _component("flat")
    noise: ComponentConfig = _component("gaussian")
    sampler: ComponentConfig = _component("poisson")
    accountant: ComponentConfig = _component("prv")

    @field_validator("max_grad_norm")
    @classmethod
    def _positive_norms(cls, v: float | list[float]) -> float | list[float]:
        values = v if isinstance(v, list) else [v]
        if not values or any(x <= 0 for x in values):
            raise ValueError("max_grad_norm must be positive (or a non-empty list of positives)")
        return v

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon")
        if self.target_epsilon is not None and self.epochs is None:
            raise ValueError("target_epsilon needs epochs (how long the budget must last)")
        from .registry import get_registry

        registry = get_registry()
        for field, kind in COMPONENT_KINDS.items():
            comp: ComponentConfig = getattr(self, field)
            try:
                registry.validate_options(kind, comp.name, comp.options)
            except Exception as exc:  # surface as a pydantic error located at the field
                raise ValueError(f"{field}: {exc}") from None
        return self

    # -- loading ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineConfig:
        return cls.model_validate({k: v for k, v in data.items() if k not in COMMAND_SECTIONS})

    @classmethod
    def from_toml(cls, path: str | Path) -> EngineConfig:
        return cls.from_dict(load_toml(path))

    def component_options(self, field: str) -> dict[str, Any]:
        """Validated options (defaults filled in) of one component."""
        from .registry import get_registry

        comp: ComponentConfig = getattr(self, field)
        return get_registry().validate_options(COMPONENT_KINDS[field], comp.name, comp.options)


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None


def config_schema() -> dict[str, Any]:
    """JSON Schema of :class:`EngineConfig` with the installed plugins' options."""
    from .registry import get_registry

    registry = get_registry()
    fields: dict[str, Any] = {}
    for field, kind in COMPONENT_KINDS.items():
        variants = []
        for info in registry.entries(kind):
            base = info.options or BaseModel
            variants.append(
                create_model(  # type: ignore[call-overload]
                    f"{kind}_{info.name}",
                    __base__=base,
                    __doc__=info.description or None,
                    name=(Literal[info.name], ...),  # type: ignore[valid-type,arg-type]
                )
            )
        annotation: Any = (
            variants[0] if len(variants) == 1 else (Any if not variants else _union(variants))
        )
        default = EngineConfig.model_fields[field].get_default(call_default_factory=True)
        fields[field] = (annotation, Field(default=default.model_dump()))
    for name, f in EngineConfig.model_fields.items():
        if name not in fields:
            fields[name] = (f.annotation, f)
    model = create_model("EngineConfig", __config__=ConfigDict(extra="forbid"), **fields)
    return model.model_json_schema()


def _union(variants: list[type[BaseModel]]) -> Any:
    from typing import Annotated, Union

    return Annotated[Union[tuple(variants)], Field(discriminator="name")]
