"""Per-sample gradients of :class:`~dpcore_lowrank.LowRankLinear`.

With ``x: [B, T, in]`` (``T = 1`` for 2-D inputs), output gradient ``g: [B, T, out]``,
``h = x Aᵀ: [B, T, r]`` and ``u = scale · g B: [B, T, r]``, sample ``i``'s gradients are

* ``lora_b``: ``scale · Σ_t g_t h_tᵀ``  ``[out, r]``
* ``lora_a``: ``Σ_t u_t x_tᵀ``          ``[r, in]``
* ``weight``: ``Σ_t g_t x_tᵀ``          (only when the base is trained)
* ``bias``:   ``Σ_t g_t``

Each is a sum of outer products, so its squared norm has the ghost form
``<P Pᵀ, Q Qᵀ>`` over positions, computed without forming the gradient when the
``T x T`` Gram matrices are smaller than the gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from dpcore.layer_sampling import MaterializingLayerGradSampler


def _outer_sq_norm(left: Tensor, right: Tensor) -> Tensor:
    """``||Σ_t left_t right_tᵀ||²`` per sample (float32)."""
    left, right = left.float(), right.float()
    positions = left.shape[1]
    if 2 * positions * positions <= left.shape[2] * right.shape[2]:
        gram = torch.bmm(left, left.transpose(1, 2)) * torch.bmm(right, right.transpose(1, 2))
        return gram.sum(dim=(1, 2))
    return torch.bmm(left.transpose(1, 2), right).pow(2).sum(dim=(1, 2))


class LowRankGradSampler(MaterializingLayerGradSampler):
    """Layer grad sampler for LowRankLinear, with ghost norms and direct clipped sums."""

    @staticmethod
    def _factors(
        layer: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """``{param: (left [B, T, p], right [B, T, q])}``: gradient = Σ_t left_t right_tᵀ."""
        x, g = inputs[0], grad_output
        batch = g.shape[0]
        x = x.reshape(batch, -1, x.shape[-1]) if batch else x.reshape(0, 1, x.shape[-1])
        g = g.reshape(batch, -1, g.shape[-1]) if batch else g.reshape(0, 1, g.shape[-1])
        x, g = x.to(g.dtype), g
        pairs: dict[str, tuple[Tensor, Tensor]] = {}
        if layer.lora_b.requires_grad:
            pairs["lora_b"] = (layer.scale * g, x @ layer.lora_a.detach().T.to(g.dtype))
        if layer.lora_a.requires_grad:
            pairs["lora_a"] = (layer.scale * (g @ layer.lora_b.detach().to(g.dtype)), x)
        if layer.weight.requires_grad:
            pairs["weight"] = (g, x)
        return pairs

    def per_sample_grads(
        self, layer: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> dict[str, Tensor]:
        out = {
            name: torch.einsum("btp,btq->bpq", left, right)
            for name, (left, right) in self._factors(layer, inputs, grad_output).items()
        }
        if layer.bias is not None and layer.bias.requires_grad:
            out["bias"] = grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1]).sum(
                1
            )
        return out

    def per_sample_sq_norms(
        self, layer: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> dict[str, Tensor]:
        out = {
            name: _outer_sq_norm(left, right)
            for name, (left, right) in self._factors(layer, inputs, grad_output).items()
        }
        if layer.bias is not None and layer.bias.requires_grad:
            g = grad_output.float()
            out["bias"] = g.reshape(g.shape[0], -1, g.shape[-1]).sum(1).pow(2).sum(1)
        return out

    def clipped_sums(
        self,
        layer: nn.Module,
        inputs: Sequence[Tensor],
        grad_output: Tensor,
        factors: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        out = {}
        for name, (left, right) in self._factors(layer, inputs, grad_output).items():
            c = factors[name].to(device=left.device, dtype=left.dtype)
            out[name] = torch.einsum("b,btp,btq->pq", c, left, right)
        if layer.bias is not None and layer.bias.requires_grad:
            g = grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])
            c = factors["bias"].to(device=g.device, dtype=g.dtype)
            out["bias"] = torch.einsum("b,btp->p", c, g)
        return out
