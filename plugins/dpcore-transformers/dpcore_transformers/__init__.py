"""dpcore for Hugging Face ``transformers`` (and PEFT): layer grad samplers for the
layers the core does not know, per-sample token losses, and a private ``Trainer``.

Everything reaches dpcore through the ``dpcore`` entry-point group
(:mod:`dpcore_transformers.plugin`); importing this package registers nothing.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .losses import causal_lm_loss, use_per_sample_loss

try:
    __version__ = version("dpcore-transformers")
except PackageNotFoundError:  # pragma: no cover - not installed
    __version__ = "0.0.0"

__all__ = ["__version__", "causal_lm_loss", "use_per_sample_loss"]


def __getattr__(name: str):  # the Trainer pulls in accelerate: import it on demand
    if name in ("DPTrainer", "PrivacyArguments"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
