"""``ew``: PyTorch's expanded weights (``torch.nn.utils._expanded_weights``).

During the forward, every trainable parameter is replaced by an ``ExpandedWeight``
whose backward writes per-sample gradients to ``param.grad_sample`` instead of
the summed ``param.grad``. It works at the level of torch functions (linear,
conv, embedding, the norms), so it needs no layer grad samplers, but it only
knows those functions, only a batch-first layout, and no recurrent layers; where
it cannot serve it says so and names ``hooks`` or ``functorch``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils._expanded_weights.expanded_weights_impl import ExpandedWeight
from torch.nn.utils.stateless import _reparametrize_module

from dpcore.capture import LossReduction, first_tensor, in_backward
from dpcore.errors import GradSampleError
from dpcore.layer_sampling import sq_norms_of, weighted_sums

from ._base import MaterializingOptions, _concat


class EWGradSampler:
    """Per-sample gradients from PyTorch's expanded weights."""

    def __init__(self, *, store_grad_sample: bool = False) -> None:
        self.store_grad_sample = store_grad_sample
        self.module: nn.Module | None = None
        self._params: dict[str, nn.Parameter] = {}
        self._pending: list[tuple[int, dict[str, Tensor]]] = []  # (batch size, grad samples)
        self._grads: dict[str, Tensor] | None = None
        self._exposed: dict[str, Tensor] = {}
        self._inside = False
        self._empty_batch = False

    def attach(
        self, module: nn.Module, *, batch_first: bool = True, loss_reduction: LossReduction = "mean"
    ) -> None:
        if not batch_first:
            raise GradSampleError(
                "grad_sample_mode='ew' (expanded weights) needs batch_first=True; use "
                "grad_sample_mode='hooks' or 'functorch' for batch_first=False"
            )
        for path, m in module.named_modules():
            if isinstance(m, nn.Embedding) and (m.padding_idx is not None or m.scale_grad_by_freq):
                raise GradSampleError(
                    f"grad_sample_mode='ew' (expanded weights) computes wrong per-sample gradients "
                    f"for embeddings with padding_idx or scale_grad_by_freq ({path}); use "
                    "grad_sample_mode='hooks' or 'functorch'"
                )
            if isinstance(m, nn.RNNBase):
                raise GradSampleError(
                    f"grad_sample_mode='ew' (expanded weights) does not support recurrent layers "
                    f"({path or '<model>'}: {type(m).__name__}); use grad_sample_mode='hooks' with "
                    "dpcore.layers.DPLSTM/DPGRU/DPRNN (ModuleValidator.fix), or 'functorch'"
                )
        self.module = module
        self.loss_reduction = loss_reduction
        self._params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        original = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._inside or not torch.is_grad_enabled():
                return original(*args, **kwargs)
            self._collect()
            first = first_tensor((args, kwargs))
            batch = first.shape[0] if first is not None and first.dim() > 0 else None
            if batch is None:
                raise GradSampleError("ew: the model's first input has no batch dimension")
            if batch == 0:  # expanded weights refuse empty batches; the answer is known
                self._pending.append(
                    (0, {n: p.new_zeros((0, *p.shape)) for n, p in self._params.items()})
                )
                return original(*args, **kwargs)
            expanded: dict[str, Any] = {
                n: ExpandedWeight(p, batch, loss_reduction) for n, p in self._params.items()
            }
            self._inside = True
            try:
                with _reparametrize_module(module, expanded, tie_weights=True):
                    return original(*args, **kwargs)
            except GradSampleError:
                raise
            except (RuntimeError, NotImplementedError, TypeError) as exc:
                raise GradSampleError(
                    f"grad_sample_mode='ew' (expanded weights) cannot run this model: {exc}. "
                    "Use grad_sample_mode='hooks' (registered layer samplers, torch.func for the "
                    "rest) or 'functorch'."
                ) from exc
            finally:
                self._inside = False

        module.forward = forward  # type: ignore[method-assign]
        self._original_forward = original
        # expanded weights give wrong per-sample gradients when a segment is recomputed
        # during backward (activation checkpointing): refuse instead
        self._recompute_handles = [
            m.register_forward_pre_hook(self._refuse_recomputation) for m in module.modules()
        ]

    @staticmethod
    def _refuse_recomputation(module: nn.Module, args: Any) -> None:
        if in_backward() and torch.is_grad_enabled():
            raise GradSampleError(
                "grad_sample_mode='ew' (expanded weights) gives wrong per-sample gradients with "
                f"activation checkpointing ({type(module).__name__} recomputed during backward); "
                "use grad_sample_mode='hooks' (or 'bk'/'ghost')"
            )

    def detach(self) -> None:
        self.clear()
        for handle in getattr(self, "_recompute_handles", []):
            handle.remove()
        self._recompute_handles = []
        if self.module is not None:
            try:
                del self.module.forward
            except AttributeError:
                pass
        self.module = None

    def named_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self._params)

    def _collect(self) -> None:
        """Move per-sample gradients written by a finished backward pass to the pending list."""
        found: dict[str, Tensor] = {}
        batch = None
        for name, p in self._params.items():
            g = getattr(p, "grad_sample", None)
            if g is None:
                continue
            del p.grad_sample  # type: ignore[attr-defined]
            if self._exposed.get(name) is g:  # ours, from the last flush
                continue
            found[name] = g
            batch = g.shape[0]
        if found and batch is not None:
            self._pending.append((batch, found))
        self._exposed = {}

    def has_pending(self) -> bool:
        return (
            self._grads is not None
            or bool(self._pending)
            or any(
                getattr(p, "grad_sample", None) is not None
                and self._exposed.get(n) is not getattr(p, "grad_sample", None)
                for n, p in self._params.items()
            )
        )

    def per_sample_grads(self) -> dict[str, Tensor]:
        if self._grads is None:
            self._collect()
            pending, self._pending = self._pending, []
            self._grads = {
                name: _concat(
                    [g[name] if name in g else p.new_zeros((b, *p.shape)) for b, g in pending], p
                )
                for name, p in self._params.items()
            }
            if self.store_grad_sample:
                for name, p in self._params.items():
                    p.grad_sample = self._grads[name]  # type: ignore[attr-defined]
                self._exposed = dict(self._grads)
        return self._grads

    def per_sample_sq_norms(self) -> dict[str, Tensor]:
        return sq_norms_of(self.per_sample_grads())

    def clipped_sums(self, factors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        sums = weighted_sums(self.per_sample_grads(), factors)
        self._grads = None
        return sums

    def clear(self) -> None:
        self._grads = None
        self._pending = []
        for p in self._params.values():
            if hasattr(p, "grad_sample"):
                del p.grad_sample  # type: ignore[attr-defined]
        self._exposed = {}


def ew_factory(*, store_grad_sample: bool = False) -> EWGradSampler:
    """PyTorch expanded weights: batch-first, non-recurrent models of standard layers."""
    return EWGradSampler(store_grad_sample=store_grad_sample)


Options = MaterializingOptions
