"""Every error dpcore raises derives from :class:`DPCoreError`.

Messages say what went wrong *and what to do*; subclasses let callers catch
one family (e.g. all plugin problems) without string matching.
"""

from __future__ import annotations


class DPCoreError(Exception):
    """Base class of all dpcore errors."""


# --- plugins -----------------------------------------------------------------
class PluginError(DPCoreError):
    """A plugin could not be found, loaded or registered."""


class UnknownPluginError(PluginError, KeyError):
    """No plugin of that kind and name is installed."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PluginConflictError(PluginError):
    """Two distributions registered the same (kind, name)."""


class PluginLoadError(PluginError):
    """A plugin failed to import or to register; the original cause is chained."""


# --- configuration -------------------------------------------------------------
class ConfigError(DPCoreError, ValueError):
    """A configuration value is invalid."""


# --- models and per-sample gradients ---------------------------------------------
class UnsupportedModuleError(DPCoreError):
    """A module cannot be trained privately as it is (names the module path and the fix)."""


class GradSampleError(DPCoreError):
    """Per-sample gradients cannot be computed correctly for this input or model."""


# --- engine ------------------------------------------------------------------------
class PrivacyEngineError(DPCoreError):
    """The engine was used in a way that would break the privacy guarantee or the training."""


class IncompatiblePluginsError(PrivacyEngineError):
    """Two chosen plugins cannot be combined (e.g. correlated noise with a sampler that
    does not guarantee the separation the accounting assumes)."""


class AccountingError(DPCoreError, ValueError):
    """An accountant was asked something it cannot answer correctly."""


class BudgetExceededError(PrivacyEngineError):
    """Taking another step would exceed the configured privacy budget."""


# --- checkpoints ---------------------------------------------------------------------
class CheckpointError(DPCoreError):
    """A checkpoint is unreadable, unsafe, or does not match the engine."""


# --- distributed -----------------------------------------------------------------------
class DistributedError(DPCoreError):
    """torch.distributed is not set up, or ranks disagree."""
