"""Helpers for writing :class:`~dpcore.protocols.LayerGradSampler` plugins.

A layer grad sampler only has to say how to compute per-sample gradients;
:class:`MaterializingLayerGradSampler` derives per-sample norms and clipped sums
from them. Fast samplers override those two methods where they can avoid
materialising ``B`` copies of the parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn


def sq_norms_of(per_sample: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Squared L2 norm per sample (float32) of each ``[B, ...]`` tensor."""
    return {
        # explicit width: reshape(B, -1) is ambiguous for an empty batch
        name: g.reshape(g.shape[0], math.prod(g.shape[1:])).float().pow(2).sum(dim=1)
        for name, g in per_sample.items()
    }


def weighted_sums(
    per_sample: Mapping[str, Tensor], factors: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """``Σ_i factors[name][i] · g_i`` for each ``[B, ...]`` tensor."""
    out = {}
    for name, g in per_sample.items():
        c = factors[name].to(device=g.device, dtype=g.dtype)
        out[name] = torch.einsum("b,b...->...", c, g)
    return out


class MaterializingLayerGradSampler:
    """Base class: implement :meth:`per_sample_grads`; norms and clipped sums follow."""

    def per_sample_grads(
        self, layer: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def per_sample_sq_norms(
        self, layer: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> dict[str, Tensor]:
        return sq_norms_of(self.per_sample_grads(layer, inputs, grad_output))

    def clipped_sums(
        self,
        layer: nn.Module,
        inputs: Sequence[Tensor],
        grad_output: Tensor,
        factors: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        return weighted_sums(self.per_sample_grads(layer, inputs, grad_output), factors)
