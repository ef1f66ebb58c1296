"""Samplers for the building blocks of :mod:`dpcore.layers`.

``RNNLinear`` is an ``nn.Linear`` and shares its sampler (registered explicitly so
``dpcore list-plugins`` shows it). ``SequenceBias`` appends a learned vector to a
sequence, so each sample's gradient is the output gradient at the last position.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from dpcore.hookspecs import Register
from dpcore.layer_sampling import MaterializingLayerGradSampler
from dpcore.layers import RNNLinear, SequenceBias

from ._common import to_param, wants_grad
from .linear import LinearGradSampler


class SequenceBiasGradSampler(MaterializingLayerGradSampler):
    """``SequenceBias`` (the ``bias_k``/``bias_v`` of DPMultiheadAttention)."""

    def per_sample_grads(
        self, layer: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> dict[str, Tensor]:
        if not wants_grad(layer, "bias"):
            return {}
        return {"bias": to_param(grad_output[:, -1], layer, "bias")}


def register_dp_layers(register: Register) -> None:
    register(RNNLinear, LinearGradSampler(), description="Linear inside DP RNN/GRU/LSTM/attention")
    register(
        SequenceBias, SequenceBiasGradSampler(), description="bias_k/bias_v of DPMultiheadAttention"
    )
