"""``nn.Conv1d/2d/3d`` through unfolding: a convolution is a linear layer applied at
every output position to the input patch under the kernel.

Unfolded, a sample's input is ``a: [G, d, L]`` (``G`` groups, ``d = C_in/G · Πk``
patch entries, ``L`` output positions) and its output gradient ``g: [G, C_out/G, L]``;
its weight gradient is ``g aᵀ`` per group. Padding (numbers, ``'same'``,
``'valid'``, and the non-zero padding modes), stride, dilation and groups are
handled by building the patches exactly as the layer's forward does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dpcore.layer_sampling import MaterializingLayerGradSampler

from ._common import Strategy, scaled, to_param, use_ghost, wants_grad


def unfold_patches(layer: Any, x: Tensor) -> Tensor:
    """``[B, C_in · Πk, L]``: the input patch behind every output position."""
    spatial = x.dim() - 2
    pad = list(layer._reversed_padding_repeated_twice)
    if any(pad):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, pad, mode=mode)
    for i in range(spatial):
        k, stride, dil = layer.kernel_size[i], layer.stride[i], layer.dilation[i]
        x = x.unfold(2 + i, dil * (k - 1) + 1, stride)  # window appended as the last dim
    if any(d != 1 for d in layer.dilation):
        index = [slice(None)] * (2 + spatial) + [slice(None, None, d) for d in layer.dilation]
        x = x[tuple(index)]
    # [B, C, L1..Ln, k1..kn] -> [B, C, k1..kn, L1..Ln]
    order = [0, 1, *range(2 + spatial, 2 + 2 * spatial), *range(2, 2 + spatial)]
    x = x.permute(order)
    width = math.prod(x.shape[1 : 2 + spatial])  # C_in * prod(k), explicit for empty batches
    return x.reshape(x.shape[0], width, math.prod(x.shape[-spatial:]))


class ConvGradSampler(MaterializingLayerGradSampler):
    """Convolutions (1-3 spatial dims), with ghost norms and direct clipped sums.

    ``strategy`` as for :class:`~.linear.LinearGradSampler`; the ghost/instantiate
    choice compares ``2 G L²`` with the weight size ``C_out · C_in/G · Πk``.
    """

    batch_first_only = True  # torch wants [B, C, ...] whatever the model's layout

    def __init__(self, strategy: Strategy = "auto") -> None:
        self.strategy: Strategy = strategy

    @staticmethod
    def _grouped(
        layer: Any, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> tuple[Tensor, Tensor]:
        x, g = inputs[0], grad_output
        dtype = torch.promote_types(x.dtype, g.dtype)
        x, g = x.to(dtype), g.to(dtype)
        batch, groups = g.shape[0], layer.groups
        a = unfold_patches(layer, x)
        positions = a.shape[-1]
        a = a.reshape(batch, groups, a.shape[1] // groups, positions)  # [B, G, d, L]
        g = g.reshape(batch, groups, g.shape[1] // groups, positions)  # [B, G, C_out/G, L]
        return a, g

    def per_sample_grads(
        self, layer: Any, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        batch = grad_output.shape[0]
        if wants_grad(layer, "weight"):
            a, g = self._grouped(layer, inputs, grad_output)
            w = torch.einsum("bgol,bgdl->bgod", g, a)
            out["weight"] = to_param(w.reshape(batch, *layer.weight.shape), layer, "weight")
        if wants_grad(layer, "bias"):
            out["bias"] = to_param(grad_output.flatten(2).sum(dim=2), layer, "bias")
        return out

    def per_sample_sq_norms(
        self, layer: Any, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if wants_grad(layer, "weight"):
            a, g = self._grouped(layer, inputs, grad_output)
            d, positions = a.shape[2], a.shape[3]
            # per group: two L x L Gram matrices against a (C_out/G) x d gradient
            ghost = use_ghost(self.strategy, positions, g.shape[2] * d)
            a, g = a.float(), g.float()
            if ghost:
                aa = torch.einsum("bgdl,bgdm->bglm", a, a)
                gg = torch.einsum("bgol,bgom->bglm", g, g)
                out["weight"] = (aa * gg).sum(dim=(1, 2, 3))
            else:
                out["weight"] = torch.einsum("bgol,bgdl->bgod", g, a).pow(2).sum(dim=(1, 2, 3))
        if wants_grad(layer, "bias"):
            out["bias"] = grad_output.float().flatten(2).sum(dim=2).pow(2).sum(dim=1)
        return out

    def clipped_sums(
        self,
        layer: Any,
        inputs: Sequence[Tensor],
        grad_output: Tensor,
        factors: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if wants_grad(layer, "weight"):
            a, g = self._grouped(layer, inputs, grad_output)
            w = torch.einsum("bgol,bgdl->god", scaled(g, factors["weight"]), a)
            out["weight"] = to_param(w.reshape(layer.weight.shape), layer, "weight")
        if wants_grad(layer, "bias"):
            gb = scaled(grad_output, factors["bias"])
            out["bias"] = to_param(gb.flatten(2).sum(dim=(0, 2)), layer, "bias")
        return out
