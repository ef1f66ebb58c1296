"""Layer grad samplers for Hugging Face layers the core does not cover.

``Conv1D`` (GPT-2, GPT, ...) is a linear layer with a transposed weight:
``y = x W + b`` with ``W: [in, out]``. Sample ``i``'s weight gradient is the
transpose of the linear layer's ``Σ_t g_it a_itᵀ``, so every quantity comes from
dpcore's own linear arithmetic: per-sample gradients from the ``nn.Linear``
sampler, and for ``bk``/``ghost`` the fused linear kernel (ghost norm or
instantiation, whichever is cheaper for each call; bf16 Gram matrices with fp32
accumulation on GPUs) — squared norms do not change under transposition. A tap
runs the layer in ``bk``/``ghost``, so autograd never forms the unclipped weight
gradient and GPT-2 keeps the one-backward-pass cost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dpcore.bookkeeping import TapOp, _LinearKernel
from dpcore.builtins.layer_samplers.linear import LinearGradSampler
from dpcore.layer_sampling import MaterializingLayerGradSampler


class Conv1DTap(TapOp):
    """How ``bk``/``ghost`` run a ``Conv1D``: forward, and the input gradient only."""

    autocast = "low"
    autocast_native = True  # a matmul and an add: autocast would not cast anything more

    @staticmethod
    def forward(layer, x, w, b):  # type: ignore[no-untyped-def]
        x2 = x.reshape(-1, x.shape[-1])
        # one GEMM with the bias in its epilogue, as Conv1D itself runs (addmm)
        out = x2 @ w if b is None else torch.addmm(b, x2, w)
        return out.reshape(*x.shape[:-1], w.shape[1]), ()

    @staticmethod
    def input_grad(layer, x, w, b, extra, g):  # type: ignore[no-untyped-def]
        return g.to(w.dtype).matmul(w.mT)


class Conv1DGradSampler(MaterializingLayerGradSampler):
    """``transformers.pytorch_utils.Conv1D``."""

    def __init__(self) -> None:
        self._linear = LinearGradSampler()
        self._kernel = _LinearKernel()

    def tap_op(self, layer: nn.Module) -> type[TapOp] | None:
        return Conv1DTap if type(layer).forward is _conv1d_forward() else None

    @staticmethod
    def _inputs(inputs: Sequence[Tensor], grad_output: Tensor) -> tuple[Tensor, Tensor]:
        a, g = inputs[0], grad_output
        dtype = torch.promote_types(a.dtype, g.dtype)
        return a.to(dtype), g.to(dtype)

    def per_sample_grads(
        self, layer: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> dict[str, Tensor]:
        out = self._linear.per_sample_grads(layer, inputs, grad_output)
        if "weight" in out:
            out["weight"] = out["weight"].transpose(1, 2)  # [B, out, in] -> [B, in, out]
        return out

    def per_sample_sq_norms(
        self, layer: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> dict[str, Tensor]:
        a, g = self._inputs(inputs, grad_output)
        return self._kernel.sq_norms(layer, a, g, _wanted(layer))

    def clipped_sums(
        self,
        layer: nn.Module,
        inputs: Sequence[Tensor],
        grad_output: Tensor,
        factors: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        a, g = self._inputs(inputs, grad_output)
        want = _wanted(layer)
        out = self._kernel.clipped_sums(
            layer, a, g, {n: f for n, f in factors.items() if n in want}, in_out=True
        )
        return {n: t.to(layer.weight.dtype) for n, t in out.items()}

    merge_calls = staticmethod(LinearGradSampler.merge_calls)


def _wanted(layer: nn.Module) -> set[str]:
    return {n for n, p in layer._parameters.items() if p is not None and p.requires_grad}


def _conv1d_forward() -> Any:
    from transformers.pytorch_utils import Conv1D

    return Conv1D.forward


class HFRMSNormGradSampler(MaterializingLayerGradSampler):
    """Hugging Face RMSNorms (``LlamaRMSNorm`` and its copies): ``w * x̂`` with
    ``x̂ = x / sqrt(mean(x²) + eps)`` computed in float32 and cast back to the input
    dtype, exactly as their forward does; sample ``i``'s gradient is ``Σ_t g_it x̂_it``."""

    def per_sample_grads(
        self, layer: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> dict[str, Tensor]:
        weight = layer._parameters.get("weight")
        if weight is None or not weight.requires_grad:
            return {}
        x, g = inputs[0], grad_output
        eps = getattr(layer, "variance_epsilon", getattr(layer, "eps", 1e-6))
        x32 = x.float()
        x_hat = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        grad = (g.float() * x_hat.float()).reshape(g.shape[0], -1, g.shape[-1]).sum(1)
        return {"weight": grad.to(weight.dtype)}


class ViTEmbeddingsGradSampler(MaterializingLayerGradSampler):
    """``ViTEmbeddings``' own parameters: ``cls_token`` and ``position_embeddings`` are
    added to the patch embeddings, so sample ``i``'s gradients are slices of its output
    gradient (``g[:, 0]`` and ``g``); ``mask_token`` (masked image modelling) from the
    ``bool_masked_pos`` input. Exact without running the layer again.

    Refuses what cannot be recovered from the output gradient: dropout active after
    the additions (``hidden_dropout_prob > 0`` in training), interpolated position
    embeddings, and a trainable ``mask_token`` when the mask was not recorded."""

    def per_sample_grads(
        self, layer: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> dict[str, Tensor]:
        from dpcore.errors import GradSampleError

        g = grad_output
        dropout = getattr(layer, "dropout", None)
        if layer.training and dropout is not None and dropout.p > 0:
            raise GradSampleError(
                "ViTEmbeddings applies dropout after adding cls_token and "
                "position_embeddings, so their per-sample gradients cannot be recovered: set "
                "config.hidden_dropout_prob = 0 (the default), or freeze "
                "embeddings.cls_token and embeddings.position_embeddings"
            )
        out: dict[str, Tensor] = {}
        pos = layer._parameters.get("position_embeddings")
        if pos is not None and pos.requires_grad:
            if g.shape[1:] != pos.shape[1:]:
                raise GradSampleError(
                    "ViTEmbeddings interpolated its position embeddings (another image "
                    "size): their per-sample gradients are not supported; train at the "
                    "configured image size or freeze embeddings.position_embeddings"
                )
            out["position_embeddings"] = g.unsqueeze(1).to(pos.dtype)
        cls = layer._parameters.get("cls_token")
        if cls is not None and cls.requires_grad:
            out["cls_token"] = g[:, :1].unsqueeze(1).to(cls.dtype)
        mask_token = layer._parameters.get("mask_token")
        if mask_token is not None and mask_token.requires_grad:
            if len(inputs) < 2:
                raise GradSampleError(
                    "ViTEmbeddings.mask_token is trainable but the grad sampler did not "
                    "record bool_masked_pos (a keyword argument): use grad_sample_mode='hooks' "
                    "or freeze embeddings.mask_token"
                )
            mask = inputs[1]
            if isinstance(mask, Tensor):
                m = mask.unsqueeze(-1).to(g.dtype)
                grad = (g[:, 1:] * m).sum(1, keepdim=True).unsqueeze(1)
            else:
                grad = torch.zeros(g.shape[0], *mask_token.shape, dtype=g.dtype, device=g.device)
            out["mask_token"] = grad.to(mask_token.dtype)
        return out
