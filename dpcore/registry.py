"""The plugin registry: every component is found here, built-ins included.

The registry is built on first use by :func:`get_registry` from the ``dpcore``
entry-point group (through pluggy) and cached; :func:`reset_registry` forgets it
(tests, or after installing a package in a running process).
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import os
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pluggy
from pydantic import BaseModel, ValidationError

from . import hookspecs
from .errors import (
    ConfigError,
    PluginConflictError,
    PluginError,
    PluginLoadError,
    UnknownPluginError,
)
from .protocols import KINDS

ENTRY_POINT_GROUP = "dpcore"
DISABLE_ENV = "DPCORE_DISABLE_PLUGINS"

Status = Literal["ok", "failed", "disabled"]


@dataclass(frozen=True)
class PluginInfo:
    """What the registry knows of one registered component (or of a failed plugin)."""

    kind: str
    name: str
    provider: str  # distribution name
    version: str
    module: str  # module that registered it
    entry_point: str
    obj: Any = None  # factory (or instance for layer grad samplers / module fixers)
    options: type[BaseModel] | None = None
    description: str = ""
    details: str = ""
    status: Status = "ok"
    error: str | None = None
    module_type: type | None = None  # layer grad samplers only
    cause: BaseException | None = field(default=None, compare=False, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "provider": self.provider,
            "version": self.version,
            "module": self.module,
            "entry_point": self.entry_point,
            "description": self.description,
            "details": self.details,
            "status": self.status,
            "error": self.error,
            "options": sorted(self.options.model_fields) if self.options else [],
        }


def _qualname(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _error_summary(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


class Registry:
    """All installed plugins, by kind and name."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], PluginInfo] = {}
        self._failed: list[PluginInfo] = []
        self._disabled: list[PluginInfo] = []
        self._layer_types: dict[type, PluginInfo] = {}

    # -- building ------------------------------------------------------------
    @classmethod
    def from_entry_points(cls, entry_points: Iterable[md.EntryPoint] | None = None) -> Registry:
        """Discover plugins of the ``dpcore`` group (or the given entry points)."""
        reg = cls()
        eps = (
            list(md.entry_points(group=ENTRY_POINT_GROUP))
            if entry_points is None
            else list(entry_points)
        )
        disabled = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
        for ep in sorted(eps, key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            provider = dist.name if dist is not None else "<unknown>"
            version = dist.version if dist is not None else ""
            if ep.name in disabled:
                reg._disabled.append(
                    PluginInfo(
                        "?",
                        ep.name,
                        provider,
                        version,
                        ep.value,
                        ep.name,
                        status="disabled",
                        error=f"disabled by {DISABLE_ENV}",
                    )
                )
                continue
            reg.load_plugin(
                ep.load,
                provider=provider,
                version=version,
                entry_point=ep.name,
                module_name=ep.value,
            )
        return reg

    def load_plugin(
        self,
        load: Callable[[], Any],
        *,
        provider: str,
        version: str = "",
        entry_point: str,
        module_name: str,
    ) -> None:
        """Import one plugin and run its register hooks; failures are recorded, not raised."""
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        staged: list[PluginInfo] = []
        try:
            plugin = load()
            pm.register(plugin, name=entry_point)
            for kind in KINDS:
                hook = getattr(pm.hook, hookspecs.HOOK_FOR_KIND[kind])
                hook(register=self._register_fn(kind, staged, provider, version, entry_point))
        except PluginConflictError:
            raise
        except Exception as exc:
            self._failed.append(
                PluginInfo(
                    "?",
                    entry_point,
                    provider,
                    version,
                    module_name,
                    entry_point,
                    status="failed",
                    error=_error_summary(exc),
                    cause=exc,
                )
            )
            return
        for info in staged:
            self._add(info)

    def _register_fn(
        self, kind: str, staged: list[PluginInfo], provider: str, version: str, entry_point: str
    ) -> Callable[..., None]:
        def register(
            name: Any,
            obj: Any,
            *,
            options: type[BaseModel] | None = None,
            description: str = "",
            details: str = "",
        ) -> None:
            module_type = None
            if kind == "layer_grad_sampler":
                if not isinstance(name, type):
                    raise PluginError(
                        f"layer grad samplers register with the module type as first argument, "
                        f"got {name!r} (from {provider})"
                    )
                module_type, name = name, _qualname(name)
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin names are non-empty strings, got {name!r}")
            if options is not None and not (
                isinstance(options, type) and issubclass(options, BaseModel)
            ):
                raise PluginError(f"options of {kind} {name!r} must be a pydantic model class")
            module = getattr(obj, "__module__", None) or type(obj).__module__
            staged.append(
                PluginInfo(
                    kind,
                    name,
                    provider,
                    version,
                    module,
                    entry_point,
                    obj=obj,
                    options=options,
                    description=description or _first_line(obj),
                    details=details,
                    module_type=module_type,
                )
            )

        return register

    def _add(self, info: PluginInfo) -> None:
        key = (info.kind, info.name)
        if key in self._entries:
            other = self._entries[key]
            raise PluginConflictError(
                f"{info.kind} {info.name!r} is registered twice: by {other.provider} "
                f"{other.version} (entry point {other.entry_point!r}, module {other.module}) and by "
                f"{info.provider} {info.version} (entry point {info.entry_point!r}, module "
                f"{info.module}). Uninstall one of them, or block one entry point with "
                f"{DISABLE_ENV}={info.entry_point}."
            )
        self._entries[key] = info
        if info.module_type is not None:
            self._layer_types[info.module_type] = info

    # -- queries -------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        self._check_kind(kind)
        return sorted(n for (k, n) in self._entries if k == kind)

    def entries(self, kind: str | None = None) -> list[PluginInfo]:
        return sorted(
            (e for e in self._entries.values() if kind is None or e.kind == kind),
            key=lambda e: (KINDS.index(e.kind), e.name),
        )

    def describe(self, include_problems: bool = True) -> list[PluginInfo]:
        """Every registered component, then failed and disabled plugins."""
        extra = self._failed + self._disabled if include_problems else []
        return self.entries() + extra

    @property
    def failures(self) -> list[PluginInfo]:
        return list(self._failed)

    def get(self, kind: str, name: str) -> PluginInfo:
        self._check_kind(kind)
        info = self._entries.get((kind, name))
        if info is not None:
            return info
        for failed in self._failed:
            if failed.name == name or name in failed.module:
                raise PluginLoadError(
                    f"{kind} {name!r} comes from plugin {failed.entry_point!r} "
                    f"({failed.provider} {failed.version}), which failed to load: {failed.error}"
                ) from failed.cause
        known = self.names(kind)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        broken = (
            f" (plugins that failed to load: {', '.join(f.entry_point for f in self._failed)}; "
            "see `dpcore list-plugins --all`)"
            if self._failed
            else ""
        )
        raise UnknownPluginError(
            f"unknown {kind} {name!r}.{hint} Installed {kind} plugins: "
            f"{', '.join(known) or '(none)'}{broken}."
        )

    def validate_options(self, kind: str, name: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``options`` against the plugin's own model; errors name its fields."""
        info = self.get(kind, name)
        if info.options is None:
            if options:
                raise ConfigError(
                    f"{kind} {name!r} takes no options, got: {', '.join(sorted(options))}"
                )
            return {}
        try:
            model = info.options.model_validate(dict(options))
        except ValidationError as exc:
            lines = []
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"]) or "(options)"
                lines.append(f"{kind}.{loc}: {err['msg']}")
            allowed = ", ".join(info.options.model_fields)
            raise ConfigError(
                f"invalid options for {kind} {name!r} ({info.provider}): "
                + "; ".join(lines)
                + f". Its options are: {allowed or '(none)'}."
            ) from None
        return {k: getattr(model, k) for k in info.options.model_fields}

    def create(
        self, kind: str, name: str, options: Mapping[str, Any] | None = None, **runtime: Any
    ) -> Any:
        """Instantiate a plugin: ``factory(**runtime, **validated_options)``."""
        info = self.get(kind, name)
        opts = self.validate_options(kind, name, options or {})
        if kind in ("layer_grad_sampler", "module_fixer"):
            return info.obj
        return info.obj(**runtime, **opts)

    def layer_grad_sampler_for(self, module: Any) -> Any | None:
        """The layer grad sampler registered for the module's type or its nearest base."""
        for t in type(module).__mro__:
            info = self._layer_types.get(t)
            if info is not None:
                return info.obj
        return None

    def module_fixers(self) -> list[tuple[str, Any]]:
        return [(e.name, e.obj) for e in self.entries("module_fixer")]

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            raise UnknownPluginError(f"unknown plugin kind {kind!r}; kinds are: {', '.join(KINDS)}")


def _first_line(obj: Any) -> str:
    doc = getattr(obj, "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


_registry: Registry | None = None


def get_registry() -> Registry:
    """The registry of installed plugins (built on first use, then cached)."""
    global _registry
    if _registry is None:
        _registry = Registry.from_entry_points()
    return _registry


def reset_registry() -> None:
    """Forget the cached registry; the next :func:`get_registry` rediscovers plugins."""
    global _registry
    _registry = None
