"""Shared pieces of the built-in layer grad samplers."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

Strategy = Literal["auto", "ghost", "instantiate"]


def wants_grad(layer: nn.Module, name: str) -> bool:
    p = layer._parameters.get(name)
    return p is not None and p.requires_grad


def use_ghost(strategy: Strategy, positions: int, param_numel: int) -> bool:
    """Whether to compute a weight's per-sample norm by the ghost identity.

    Ghost norm keeps two ``T x T`` Gram matrices per sample (``T`` = positions:
    tokens, or output pixels of a convolution); instantiation keeps one gradient
    of ``p * d`` entries per sample. Choose the smaller.
    """
    if strategy == "ghost":
        return True
    if strategy == "instantiate":
        return False
    return 2 * positions * positions <= param_numel


def ghost_sq_norm(a: Tensor, g: Tensor) -> Tensor:
    """``||Σ_t a_t g_tᵀ||²`` per sample, from ``a: [B, T, d]`` and ``g: [B, T, p]``,
    without forming the ``p x d`` gradient: ``<a aᵀ, g gᵀ>`` (float32)."""
    a = a.float()
    g = g.float()
    if a.shape[1] == 1:  # outer product: ||a g^T||^2 = ||a||^2 ||g||^2
        return a.pow(2).sum(dim=(1, 2)) * g.pow(2).sum(dim=(1, 2))
    aa = torch.bmm(a, a.transpose(1, 2))
    gg = torch.bmm(g, g.transpose(1, 2))
    return (aa * gg).sum(dim=(1, 2))


def instantiated_sq_norm(a: Tensor, g: Tensor) -> Tensor:
    """Same as :func:`ghost_sq_norm` by forming each sample's ``p x d`` gradient."""
    grad = torch.bmm(g.float().transpose(1, 2), a.float())
    return grad.pow(2).sum(dim=(1, 2))


def scaled(g: Tensor, factors: Tensor) -> Tensor:
    """``g`` with row ``i`` multiplied by ``factors[i]`` (in ``g``'s dtype)."""
    c = factors.to(device=g.device, dtype=g.dtype)
    return g * c.reshape(-1, *([1] * (g.dim() - 1)))


def to_param(t: Tensor, layer: nn.Module, name: str) -> Tensor:
    p = layer._parameters[name]
    assert p is not None
    return t.to(dtype=p.dtype)
