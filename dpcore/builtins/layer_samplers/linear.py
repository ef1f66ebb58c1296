"""``nn.Linear``: per-sample gradients, ghost norms and book-keeping sums.

For an input ``a: [B, T, d]`` (``T = 1`` for 2-D inputs; all middle dimensions are
flattened into ``T``) and output gradient ``g: [B, T, p]``, sample ``i``'s weight
gradient is ``Σ_t g_it a_itᵀ`` and its bias gradient ``Σ_t g_it``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from dpcore.layer_sampling import MaterializingLayerGradSampler

from ._common import (
    Strategy,
    ghost_sq_norm,
    instantiated_sq_norm,
    scaled,
    to_param,
    use_ghost,
    wants_grad,
)


def _as_sequence(inputs: Sequence[Tensor], grad_output: Tensor) -> tuple[Tensor, Tensor]:
    a, g = inputs[0], grad_output
    # under autocast the recorded input may be float32 and the output gradient bfloat16
    dtype = torch.promote_types(a.dtype, g.dtype)
    a, g = a.to(dtype), g.to(dtype)
    batch = g.shape[0]
    positions = math.prod(g.shape[1:-1])  # explicit: -1 is ambiguous for an empty batch
    return a.reshape(batch, positions, a.shape[-1]), g.reshape(batch, positions, g.shape[-1])


class LinearGradSampler(MaterializingLayerGradSampler):
    """Linear layers (2-D and sequence inputs), with ghost norms and direct clipped sums.

    ``strategy`` fixes how weight norms are computed: ``"auto"`` (default) picks
    per call the cheaper of ghost norm (``2 T²`` per sample) and instantiation
    (``p·d`` per sample); ``"ghost"`` and ``"instantiate"`` force one (tests, benchmarks).
    """

    def __init__(self, strategy: Strategy = "auto") -> None:
        self.strategy: Strategy = strategy

    def per_sample_grads(
        self, layer: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> dict[str, Tensor]:
        a, g = _as_sequence(inputs, grad_output)
        out: dict[str, Tensor] = {}
        if wants_grad(layer, "weight"):
            out["weight"] = to_param(torch.einsum("btp,btd->bpd", g, a), layer, "weight")
        if wants_grad(layer, "bias"):
            out["bias"] = to_param(g.sum(dim=1), layer, "bias")
        return out

    def per_sample_sq_norms(
        self, layer: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> dict[str, Tensor]:
        a, g = _as_sequence(inputs, grad_output)
        out: dict[str, Tensor] = {}
        if wants_grad(layer, "weight"):
            positions, d, p = a.shape[1], a.shape[2], g.shape[2]
            if positions == 1 or use_ghost(self.strategy, positions, p * d):
                out["weight"] = ghost_sq_norm(a, g)
            else:
                out["weight"] = instantiated_sq_norm(a, g)
        if wants_grad(layer, "bias"):
            out["bias"] = g.float().sum(dim=1).pow(2).sum(dim=1)
        return out

    def clipped_sums(
        self,
        layer: nn.Module,
        inputs: Sequence[Tensor],
        grad_output: Tensor,
        factors: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        a, g = _as_sequence(inputs, grad_output)
        out: dict[str, Tensor] = {}
        if wants_grad(layer, "weight"):
            gc = scaled(g, factors["weight"]).to(a.dtype)
            out["weight"] = to_param(gc.flatten(0, 1).T @ a.flatten(0, 1), layer, "weight")
        if wants_grad(layer, "bias"):
            out["bias"] = to_param(scaled(g, factors["bias"]).sum(dim=(0, 1)), layer, "bias")
        return out

    @staticmethod
    def merge_calls(
        calls: Sequence[tuple[Sequence[Tensor], Tensor]],
    ) -> tuple[list[Tensor], Tensor]:
        """Several calls of one layer on the same batch act like one call on the
        concatenated positions: ``Σ_calls Σ_t g aᵀ``. Exact for norms too."""
        seqs = [_as_sequence(inputs, g) for inputs, g in calls]
        return [torch.cat([a for a, _ in seqs], dim=1)], torch.cat([g for _, g in seqs], dim=1)
