"""``nn.Embedding`` and ``nn.EmbeddingBag``.

Both reduce to *entries* ``(sample b, row id, gradient row r)``: sample ``b``'s
gradient is the sum of its entries' rows scattered into a ``[V, D]`` matrix. Its
squared norm is found without that matrix (the scatter form): sum the rows of
equal ``(b, id)`` and add up their squared norms, ``O(B·T·D)`` whatever ``V``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dpcore.errors import GradSampleError
from dpcore.layer_sampling import MaterializingLayerGradSampler

from ._common import to_param, wants_grad


@dataclass
class Entries:
    batch_size: int
    sample: Tensor  # [N] which sample each entry belongs to
    ids: Tensor  # [N] row of the table
    rows: Tensor  # [N, D] gradient contribution

    def keys(self, num_rows: int) -> Tensor:
        return self.sample * num_rows + self.ids


def _drop_padding(entries: Entries, padding_idx: int | None) -> Entries:
    if padding_idx is None:
        return entries
    keep = entries.ids != padding_idx
    return Entries(entries.batch_size, entries.sample[keep], entries.ids[keep], entries.rows[keep])


class _ScatterGradSampler(MaterializingLayerGradSampler):
    def entries(self, layer: Any, inputs: Sequence[Tensor], grad_output: Tensor) -> Entries:
        raise NotImplementedError

    def per_sample_grads(
        self, layer: Any, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> dict[str, Tensor]:
        if not wants_grad(layer, "weight"):
            return {}
        e = self.entries(layer, inputs, grad_output)
        num_rows, dim = layer.weight.shape
        out = torch.zeros(e.batch_size * num_rows, dim, device=e.rows.device, dtype=e.rows.dtype)
        out.index_add_(0, e.keys(num_rows), e.rows)
        return {"weight": to_param(out.reshape(e.batch_size, num_rows, dim), layer, "weight")}

    def per_sample_sq_norms(
        self, layer: Any, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> dict[str, Tensor]:
        if not wants_grad(layer, "weight"):
            return {}
        e = self.entries(layer, inputs, grad_output)
        num_rows = layer.weight.shape[0]
        unique, inverse = torch.unique(e.keys(num_rows), return_inverse=True)
        summed = torch.zeros(
            len(unique), e.rows.shape[1], device=e.rows.device, dtype=torch.float32
        )
        summed.index_add_(0, inverse, e.rows.float())
        norms = torch.zeros(e.batch_size, device=e.rows.device, dtype=torch.float32)
        norms.index_add_(
            0, torch.div(unique, num_rows, rounding_mode="floor"), summed.pow(2).sum(1)
        )
        return {"weight": norms}

    def clipped_sums(
        self,
        layer: Any,
        inputs: Sequence[Tensor],
        grad_output: Tensor,
        factors: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        if not wants_grad(layer, "weight"):
            return {}
        e = self.entries(layer, inputs, grad_output)
        c = factors["weight"].to(device=e.rows.device, dtype=e.rows.dtype)[e.sample]
        out = torch.zeros_like(layer.weight, dtype=e.rows.dtype)
        out.index_add_(0, e.ids, e.rows * c[:, None])
        return {"weight": to_param(out, layer, "weight")}


def _scale_by_frequency(e: Entries, num_rows: int) -> Entries:
    """``scale_grad_by_freq``: a sample alone divides each row by how often *it* uses it."""
    _, inverse, counts = torch.unique(e.keys(num_rows), return_inverse=True, return_counts=True)
    rows = e.rows / counts[inverse].to(e.rows.dtype)[:, None]
    return Entries(e.batch_size, e.sample, e.ids, rows)


class EmbeddingGradSampler(_ScatterGradSampler):
    """Embedding tables (any index shape; ``padding_idx``, ``scale_grad_by_freq``)."""

    def entries(self, layer: Any, inputs: Sequence[Tensor], grad_output: Tensor) -> Entries:
        ids = inputs[0]
        batch = grad_output.shape[0]
        dim = grad_output.shape[-1]
        # reshape (not view): ids may be an expanded, non-contiguous broadcast tensor
        flat_ids = ids.reshape(batch, ids[0].numel() if batch else math.prod(ids.shape[1:]))
        sample = torch.arange(batch, device=ids.device).repeat_interleave(flat_ids.shape[1])
        e = Entries(batch, sample, flat_ids.reshape(-1), grad_output.reshape(-1, dim))
        e = _drop_padding(e, layer.padding_idx)
        if layer.scale_grad_by_freq:
            e = _scale_by_frequency(e, layer.weight.shape[0])
        return e


class EmbeddingBagGradSampler(_ScatterGradSampler):
    """Bags of embeddings, ``mode='sum'`` or ``'mean'`` (with ``per_sample_weights``,
    offsets or 2-D input, ``padding_idx``). Each bag is one sample, so the batch
    dimension is the first even in sequence-first models."""

    batch_first_only = True

    def entries(self, layer: Any, inputs: Sequence[Tensor], grad_output: Tensor) -> Entries:
        if layer.mode == "max":
            raise GradSampleError(
                "EmbeddingBag(mode='max') has no per-sample gradient sampler; use mode='sum' or "
                "'mean', or grad_sample_mode='functorch'"
            )
        if layer.scale_grad_by_freq:
            raise GradSampleError(
                "EmbeddingBag(scale_grad_by_freq=True) is not supported; set it to False"
            )
        ids = inputs[0]
        offsets = inputs[1] if len(inputs) > 1 else None
        weights = inputs[2] if len(inputs) > 2 else None
        batch = grad_output.shape[0]
        if ids.dim() == 2:
            sample = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(ids.shape[1])
            ids = ids.reshape(-1)
        else:
            if offsets is None:
                raise GradSampleError("EmbeddingBag with 1-D input needs offsets")
            positions = torch.arange(ids.shape[0], device=ids.device)
            sample = torch.searchsorted(offsets, positions, right=True) - 1
        if weights is not None:
            weights = weights.reshape(-1)
        keep = torch.ones_like(ids, dtype=torch.bool)
        if layer.padding_idx is not None:
            keep = ids != layer.padding_idx
        sample, ids = sample[keep], ids[keep]
        scale = torch.ones(ids.shape[0], device=ids.device, dtype=grad_output.dtype)
        if weights is not None:
            scale = weights[keep].to(grad_output.dtype)
        if layer.mode == "mean":
            counts = torch.bincount(sample, minlength=batch).clamp(min=1)
            scale = scale / counts[sample].to(scale.dtype)
        rows = grad_output[sample] * scale[:, None]
        return Entries(batch, sample, ids, rows)


__all__ = ["EmbeddingBagGradSampler", "EmbeddingGradSampler"]
