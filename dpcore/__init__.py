"""dpcore: differentially private training for PyTorch on a small, pluggable core.

Public names are imported lazily so ``import dpcore`` stays cheap and so the
command line starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "PrivacyEngine": "dpcore.engine",
    "DPOptimizer": "dpcore.optimizer",
    "DPDataLoader": "dpcore.data",
    "BatchMemoryManager": "dpcore.data",
    "ModuleValidator": "dpcore.validate",
    "DPDDP": "dpcore.distributed",
    "get_noise_multiplier": "dpcore.accounting",
    "accounting": "dpcore.accounting",
    "choose_bands": "dpcore.correlated",
    "EngineConfig": "dpcore.config",
    "get_registry": "dpcore.registry",
    "reset_registry": "dpcore.registry",
    "verify": "dpcore.verify",
    "audit": "dpcore.audit",
    "errors": "dpcore.errors",
    "layers": "dpcore.layers",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'dpcore' has no attribute {name!r}")
    module = importlib.import_module(target)
    value = module if target.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from . import errors as errors
    from .config import EngineConfig as EngineConfig
    from .registry import get_registry as get_registry
    from .registry import reset_registry as reset_registry
