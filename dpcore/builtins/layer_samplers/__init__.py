"""Built-in layer grad samplers for torch and dpcore layers, one module per family.

Registered per module type; the registry resolves a layer through its type's MRO,
so subclasses of these layers are covered too.
"""

from __future__ import annotations

from torch import nn

from dpcore.hookspecs import Register, hookimpl

from .conv import ConvGradSampler
from .embedding import EmbeddingBagGradSampler, EmbeddingGradSampler
from .linear import LinearGradSampler
from .norms import (
    GroupNormGradSampler,
    InstanceNormGradSampler,
    LayerNormGradSampler,
    RMSNormGradSampler,
)

__all__ = [
    "ConvGradSampler",
    "EmbeddingBagGradSampler",
    "EmbeddingGradSampler",
    "GroupNormGradSampler",
    "InstanceNormGradSampler",
    "LayerNormGradSampler",
    "LinearGradSampler",
    "RMSNormGradSampler",
]


@hookimpl
def dpcore_register_layer_grad_samplers(register: Register) -> None:
    linear = LinearGradSampler()
    register(nn.Linear, linear, description="Linear (2-D and sequence inputs); ghost norms")
    conv = ConvGradSampler()
    for conv_type in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        register(conv_type, conv, description="convolution via unfold; ghost norms")
    register(nn.Embedding, EmbeddingGradSampler(), description="embedding; scatter-form norms")
    register(nn.EmbeddingBag, EmbeddingBagGradSampler(), description="embedding bag (sum/mean)")
    register(nn.LayerNorm, LayerNormGradSampler(), description="LayerNorm (affine)")
    register(nn.GroupNorm, GroupNormGradSampler(), description="GroupNorm (affine)")
    instance = InstanceNormGradSampler()
    for norm_type in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
        register(norm_type, instance, description="InstanceNorm (affine)")
    register(nn.RMSNorm, RMSNormGradSampler(), description="RMSNorm")

    from .dp import register_dp_layers

    register_dp_layers(register)
