"""Per-sample gradients with ``torch.func``: ``vmap`` over ``vjp`` of one call.

For every recorded call of a module, each sample's forward is recomputed with its
own slice of the inputs (as a batch of one) and pulled back with its own slice of
the output gradient; ``vmap`` runs all samples at once. Because only the output
gradient is needed, the user's loop stays ``loss.backward()``.

* :func:`per_sample_grads_of_call` is the fallback of the ``hooks`` sampler for a
  layer without a registered layer grad sampler (any arguments, several inputs
  and outputs), differentiating only that layer's own parameters.
* :class:`FunctorchGradSampler` (``functorch``) applies it to the whole model:
  one recorded call of the root module, every trainable parameter at once. It
  needs no layer grad sampler, so it supports any layer whose operations
  ``vmap`` supports, parameters used directly in ``forward``, and so on.

Random layers (dropout) are re-sampled in the recomputation; the per-sample
gradients are then those of another dropout mask than the one the forward used.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils import _pytree as pytree

from dpcore.capture import ActivationCapture, CapturedBatch, LayerCall, LossReduction
from dpcore.errors import GradSampleError

from ._base import MaterializingGradSampler, MaterializingOptions


def per_sample_grads_of_call(
    layer: nn.Module,
    call: LayerCall,
    params: dict[str, nn.Parameter],
    *,
    capture: ActivationCapture | None = None,
    path: str = "",
) -> dict[str, Tensor]:
    """``{name: [B, *shape]}`` for ``params`` (names relative to ``layer``) from one call."""
    batch, dim = call.batch_size, call.batch_dim
    if batch == 0:
        return {n: p.new_zeros((0, *p.shape)) for n, p in params.items()}
    leaves, spec = pytree.tree_flatten((call.args, call.kwargs))
    # each tensor argument is batched along the batch dimension, or along dim 0 if only
    # that one has the batch size (e.g. sequence lengths of a sequence-first model);
    # any other tensor is shared by all samples
    in_dims: dict[int, int] = {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, Tensor):
            if leaf.dim() > dim and leaf.shape[dim] == batch:
                in_dims[i] = dim
            elif leaf.dim() > 0 and leaf.shape[0] == batch:
                in_dims[i] = 0
    batched = list(in_dims)
    # outputs that received no gradient (e.g. the final state of an RNN nobody used) are
    # left out of the pull-back: their cotangent is zero
    differentiable = [
        i
        for i, (o, g) in enumerate(zip(call.outputs, call.grad_outputs, strict=True))
        if g is not None and (o.is_floating_point() or o.is_complex())
    ]
    cotangents = call.batched_grad_outputs()  # batch first
    cotangents = [cotangents[i] for i in differentiable]
    out_dims = [call.output_dims[i] if call.output_dims else dim for i in differentiable]
    detached = {n: p.detach() for n, p in params.items()}

    def one_sample(p: dict[str, Tensor], xs: tuple[Tensor, ...], gs: tuple[Tensor, ...]) -> Any:
        def forward(q: dict[str, Tensor]) -> tuple[Tensor, ...]:
            local = list(leaves)
            for i, x in zip(batched, xs, strict=True):
                local[i] = x.unsqueeze(in_dims[i])
            args, kwargs = pytree.tree_unflatten(local, spec)
            # forward() rather than __call__: no module hooks (e.g. the DP optimizer's flush)
            with _reparametrize_module(layer, q, tie_weights=True):
                out = layer.forward(*args, **kwargs)
            tensors = [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor)]
            return tuple(tensors[i] for i in differentiable)

        _, pullback = torch.func.vjp(forward, p)[:2]
        return pullback(tuple(g.unsqueeze(d) for g, d in zip(gs, out_dims, strict=True)))[0]

    xs = tuple(leaves[i] for i in batched)
    x_dims = tuple(in_dims[i] for i in batched)
    vmapped = torch.func.vmap(one_sample, in_dims=(None, x_dims, 0), randomness="different")
    paused = capture.paused() if capture is not None else contextlib.nullcontext()
    try:
        with paused, torch.enable_grad():
            return vmapped(detached, xs, tuple(cotangents))
    except GradSampleError:
        raise
    except Exception as exc:  # vmap cannot batch some operation of this layer
        where = f"layer {path!r} ({type(layer).__name__})" if path else type(layer).__name__
        if path == "<model>":  # whole-model functorch: the layer-by-layer modes may serve it
            raise GradSampleError(
                f"grad_sample_mode='functorch' cannot run the model ({type(layer).__name__}) "
                f"under torch.func.vmap: {type(exc).__name__}: {exc}. Use grad_sample_mode="
                "'bk' (or 'ghost' or 'hooks'), which work layer by layer and need no vmap of "
                "the whole model."
            ) from exc
        raise GradSampleError(
            f"torch.func could not compute per-sample gradients of {where}: "
            f"{type(exc).__name__}: {exc}. Register a layer grad sampler for "
            f"{type(layer).__qualname__} (see docs/writing-layer-grad-samplers.md) or, for "
            "torch recurrent layers, use dpcore.layers (ModuleValidator.fix does this)."
        ) from exc


class FunctorchGradSampler(MaterializingGradSampler):
    """Whole-model ``torch.func``: per-sample gradients of every parameter from one
    ``vmap(vjp)`` of the model's forward; needs no layer grad samplers."""

    def make_capture(
        self, module: nn.Module, *, batch_first: bool, loss_reduction: LossReduction
    ) -> ActivationCapture:
        return ActivationCapture(
            module, batch_first=batch_first, loss_reduction=loss_reduction, layers=[("", module)]
        )

    def compute_batch(self, batch: CapturedBatch) -> dict[str, Tensor]:
        assert self.module is not None and self.capture is not None
        grads: dict[str, Tensor] = {}
        for call in batch.calls.get(self.module, []):
            call.check_unmodified("<model>")
            for name, g in per_sample_grads_of_call(
                self.module, call, self._params, capture=self.capture, path="<model>"
            ).items():
                self.accumulate(grads, name, g)
        return self.completed(grads, batch.batch_size)


def functorch_factory(*, store_grad_sample: bool = False) -> FunctorchGradSampler:
    """Whole-model torch.func (vmap over vjp): any layer vmap supports."""
    return FunctorchGradSampler(store_grad_sample=store_grad_sample)


Options = MaterializingOptions
__all__ = ["FunctorchGradSampler", "Options", "functorch_factory", "per_sample_grads_of_call"]
