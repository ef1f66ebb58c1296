"""Normalisation layers: ``LayerNorm``, ``GroupNorm``, ``InstanceNorm1d/2d/3d``, ``RMSNorm``.

Each sample's affine gradients are ``Σ g · x̂`` (weight) and ``Σ g`` (bias), summed
over the positions of that sample that share the parameter entry, where ``x̂`` is the
normalised input recomputed from the recorded input. The per-sample gradients are
as small as the parameters, so the defaults (materialise, then reduce) are the fast
path here. They compute in (at least) float32, as autocast runs these layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dpcore.layer_sampling import MaterializingLayerGradSampler

from ._common import to_param, wants_grad


def _at_least_float32(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Normalisation runs in float32 under autocast; recompute ``x̂`` the same way
    (a scale's gradient ``Σ g·x̂`` nearly cancels, so bf16 would lose it)."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, g.dtype), torch.float32)
    return x.to(dtype), g.to(dtype)


def _sum_to(t: Tensor, keep_trailing: int) -> Tensor:
    """Sum ``[B, ..., *trailing]`` over the middle dimensions -> ``[B, *trailing]``."""
    middle = tuple(range(1, t.dim() - keep_trailing))
    return t.sum(dim=middle) if middle else t


class LayerNormGradSampler(MaterializingLayerGradSampler):
    """``nn.LayerNorm`` (elementwise affine, with or without bias)."""

    def per_sample_grads(
        self, layer: Any, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> dict[str, Tensor]:
        x, g = _at_least_float32(inputs[0], grad_output)
        shape = tuple(layer.normalized_shape)
        out: dict[str, Tensor] = {}
        if wants_grad(layer, "weight"):
            x_hat = F.layer_norm(x, shape, None, None, layer.eps)
            out["weight"] = to_param(_sum_to(g * x_hat, len(shape)), layer, "weight")
        if wants_grad(layer, "bias"):
            out["bias"] = to_param(_sum_to(g, len(shape)), layer, "bias")
        return out


class RMSNormGradSampler(MaterializingLayerGradSampler):
    """``nn.RMSNorm``."""

    def per_sample_grads(
        self, layer: Any, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> dict[str, Tensor]:
        if not wants_grad(layer, "weight"):
            return {}
        x, g = _at_least_float32(inputs[0], grad_output)
        shape = tuple(layer.normalized_shape)
        x_hat = F.rms_norm(x, shape, None, layer.eps)
        return {"weight": to_param(_sum_to(g * x_hat, len(shape)), layer, "weight")}


class GroupNormGradSampler(MaterializingLayerGradSampler):
    """``nn.GroupNorm`` (affine); parameters are per channel (dim 1)."""

    batch_first_only = True  # torch wants [B, C, ...] whatever the model's layout

    def per_sample_grads(
        self, layer: Any, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> dict[str, Tensor]:
        x, g = _at_least_float32(inputs[0], grad_output)
        out: dict[str, Tensor] = {}
        if wants_grad(layer, "weight"):
            x_hat = F.group_norm(x, layer.num_groups, None, None, layer.eps)
            out["weight"] = to_param((g * x_hat).flatten(2).sum(2), layer, "weight")
        if wants_grad(layer, "bias"):
            out["bias"] = to_param(g.flatten(2).sum(2), layer, "bias")
        return out


class InstanceNormGradSampler(MaterializingLayerGradSampler):
    """``nn.InstanceNorm1d/2d/3d`` with ``affine=True``; per channel, like GroupNorm
    with one group per channel. Uses the running statistics exactly when the layer's
    forward did (eval mode with ``track_running_stats``)."""

    batch_first_only = True  # torch wants [B, C, ...] whatever the model's layout

    def per_sample_grads(
        self, layer: Any, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> dict[str, Tensor]:
        x, g = _at_least_float32(inputs[0], grad_output)
        out: dict[str, Tensor] = {}
        if g.shape[0] == 0:  # F.instance_norm rejects an empty batch
            return {
                n: p.new_zeros((0, *p.shape))
                for n, p in layer.named_parameters()
                if p.requires_grad
            }
        if wants_grad(layer, "weight"):
            use_input_stats = layer.training or not layer.track_running_stats
            with torch.no_grad():
                x_hat = F.instance_norm(
                    x,
                    None if use_input_stats else layer.running_mean,
                    None if use_input_stats else layer.running_var,
                    None,
                    None,
                    use_input_stats,
                    0.0,
                    layer.eps,
                )
            out["weight"] = to_param((g * x_hat).flatten(2).sum(2), layer, "weight")
        if wants_grad(layer, "bias"):
            out["bias"] = to_param(g.flatten(2).sum(2), layer, "bias")
        return out
