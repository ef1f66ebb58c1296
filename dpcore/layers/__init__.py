"""Drop-in replacements for torch layers whose per-sample gradients need a
rewrite: recurrent layers and multi-head attention. Built from linear sub-layers,
so every grad sampler that knows ``nn.Linear`` serves them."""

from __future__ import annotations

from ._base import RNNLinear, SequenceBias
from .attention import DPMultiheadAttention
from .rnn import DPGRU, DPLSTM, DPRNN, DPRNNBase

__all__ = [
    "DPGRU",
    "DPLSTM",
    "DPRNN",
    "DPMultiheadAttention",
    "DPRNNBase",
    "RNNLinear",
    "SequenceBias",
]
