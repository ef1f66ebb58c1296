"""A LoRA-style low-rank linear layer and its dpcore layer grad sampler."""

from __future__ import annotations

from .layer import LowRankLinear
from .sampler import LowRankGradSampler

__all__ = ["LowRankGradSampler", "LowRankLinear"]
__version__ = "0.1.0"
