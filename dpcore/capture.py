"""Record, for every trainable layer, what it saw in forward and received in backward.

Grad samplers that work layer by layer (``hooks``, and the fast ``ghost``/``bk``
samplers) need, for each call of each layer, the inputs of the call and the
gradient of the loss with respect to its output. :class:`ActivationCapture`
installs forward hooks that record the inputs and put a tensor hook on each
output; the tensor hooks record the output gradients during backward.

It takes care of the things that make per-sample gradients silently wrong:

* a layer called several times in one forward keeps one :class:`LayerCall` per
  call (their per-sample gradients add up);
* ``batch_first=False``: :meth:`LayerCall.batch_first` moves the batch dimension
  (dim 1) to the front. Layers that are batch-first by nature are left alone: those
  marked ``_dpcore_batch_first = True`` (the linear cells inside
  :mod:`dpcore.layers`), those ``batch_first_layer`` names (the ``hooks`` sampler
  names layers whose sampler has ``batch_first_only = True``: convolutions,
  GroupNorm, InstanceNorm, EmbeddingBag), and calls whose output has fewer than
  three dimensions (``[B, features]``, e.g. a classifier head on a pooled state);
* ``loss_reduction="mean"``: output gradients are multiplied by the batch size so
  that row ``i`` is sample ``i``'s own gradient;
* an output whose batch dimension is not the batch size (an input broadcast over
  the batch, or a model that moved the batch dimension) raises
  :class:`~dpcore.errors.GradSampleError` during backward, naming the layer;
* inputs modified in place after forward are detected;
* activation checkpointing: the recomputation of a segment during backward is
  recorded into the batch being backwarded (the first, discarded forward of the
  segment never receives gradients and is dropped);
* frozen parameters are ignored, and layers with no trainable parameter are not
  hooked at all.

A *batch* is everything recorded between the start of a root forward and the
backward pass that followed it. Completed batches wait in :attr:`pending` until
the grad sampler has used them; a new forward pass does not discard them, so the
DP optimizer may flush before or after this capture's own pre-forward hook.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .errors import GradSampleError

LossReduction = Literal["mean", "sum"]


def trainable_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, layer)`` for every submodule owning a parameter that requires grad."""
    return [
        (path, m)
        for path, m in module.named_modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def trainable_parameter_names(module: nn.Module) -> dict[int, str]:
    """``id(param) -> qualified name`` (first name of a tied parameter)."""
    return {id(p): name for name, p in module.named_parameters() if p.requires_grad}


def in_backward() -> bool:
    """Whether autograd is running a backward pass now (e.g. a checkpointed segment is
    being recomputed)."""
    return torch._C._current_graph_task_id() != -1


def exact_layer_sampler(registry: Any, layer: nn.Module) -> Any | None:
    """The layer grad sampler registered for ``layer``'s type or a base type, but only if
    the layer computes what that base computes: a subclass that overrides ``forward``
    (``class Masked(nn.Linear)`` multiplying its weight by a mask) would get the base's
    formulas and wrong gradients, so it gets the torch.func fallback instead."""
    by_type = {e.module_type: e.obj for e in registry.entries("layer_grad_sampler")}
    for base in type(layer).__mro__:
        sampler = by_type.get(base)
        if sampler is not None:
            return sampler if type(layer).forward is getattr(base, "forward", None) else None
    return None


def first_tensor(tree: Any) -> Tensor | None:
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, Tensor):
            return leaf
    return None


@dataclass
class LayerCall:
    """One call of one layer: its inputs and the gradient of the loss w.r.t. its outputs."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[Tensor]  # detached output tensors, in pytree order
    grad_outputs: list[Tensor | None]
    batch_dim: int
    batch_size: int
    loss_reduction: LossReduction
    versions: list[tuple[Tensor, int]] = field(default_factory=list)
    #: batch dimension of each output (the root module's outputs may have it first
    #: even when ``batch_first=False``, e.g. logits ``[B, C]`` of a sequence model)
    output_dims: list[int] = field(default_factory=list)

    @property
    def has_grad(self) -> bool:
        return any(g is not None for g in self.grad_outputs)

    def check_unmodified(self, path: str) -> None:
        for t, version in self.versions:
            if t._version != version:
                raise GradSampleError(
                    f"an input of layer {path!r} was modified in place after the forward pass, "
                    "so its per-sample gradients cannot be computed; clone it before modifying "
                    "(e.g. avoid `x += ...` on a tensor a trainable layer has read)"
                )

    def _to_front(self, t: Tensor) -> Tensor:
        if self.batch_dim == 0 or t.dim() <= self.batch_dim:
            return t
        return t.movedim(self.batch_dim, 0)

    def batched_args(self) -> tuple[Any, ...]:
        """Positional arguments with the batch dimension first (tensors only)."""
        return tuple(self._to_front(a) if isinstance(a, Tensor) else a for a in self.args)

    def batched_grad_outputs(self) -> list[Tensor]:
        """Output gradients, batch dimension first, rescaled to per-sample losses
        (zeros for outputs that received no gradient)."""
        scale = float(self.batch_size) if self.loss_reduction == "mean" else 1.0
        out = []
        for i, (o, g) in enumerate(zip(self.outputs, self.grad_outputs, strict=True)):
            g = torch.zeros_like(o) if g is None else g
            dim = self.output_dims[i] if i < len(self.output_dims) else self.batch_dim
            g = g.movedim(dim, 0) if dim and g.dim() > dim else g
            out.append(g * scale if scale != 1.0 else g)
        return out

    def batch_first(self) -> tuple[tuple[Any, ...], Tensor]:
        """``(inputs, grad_output)`` in the :class:`~dpcore.protocols.LayerGradSampler`
        convention, for single-output layers."""
        return self.batched_args(), self.batched_grad_outputs()[0]


@dataclass
class CapturedBatch:
    """Everything recorded for one forward/backward pass."""

    batch_size: int
    calls: dict[nn.Module, list[LayerCall]] = field(default_factory=dict)

    @property
    def has_grad(self) -> bool:
        return any(c.has_grad for calls in self.calls.values() for c in calls)

    def drop_unused(self) -> None:
        """Forget calls whose outputs got no gradient (they contribute nothing)."""
        self.calls = {m: [c for c in calls if c.has_grad] for m, calls in self.calls.items()}
        self.calls = {m: calls for m, calls in self.calls.items() if calls}


class ActivationCapture:
    """Forward/backward hooks recording :class:`LayerCall` s of every trainable layer."""

    def __init__(
        self,
        module: nn.Module,
        *,
        batch_first: bool = True,
        loss_reduction: LossReduction = "mean",
        keep_inputs: bool = True,
        layers: list[tuple[str, nn.Module]] | None = None,
        batch_first_layer: Callable[[nn.Module], bool] | None = None,
    ) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise GradSampleError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.module = module
        self.batch_first = batch_first
        self.loss_reduction: LossReduction = loss_reduction
        self.keep_inputs = keep_inputs
        self._batch_first_layer = batch_first_layer
        self.layers = trainable_layers(module) if layers is None else list(layers)
        self.paths = {m: path for path, m in self.layers}
        self.pending: list[CapturedBatch] = []
        self._current: CapturedBatch | None = None
        self._paused = 0
        self._handles: list[Any] = []
        self._handles.append(
            module.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True)
        )
        for _, layer in self.layers:
            if layer is not module:
                self._handles.append(layer.register_forward_pre_hook(self._expand_broadcast))
            self._handles.append(layer.register_forward_hook(self._forward_hook, with_kwargs=True))

    # -- lifecycle -----------------------------------------------------------------------
    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def clear(self) -> None:
        self.pending.clear()
        self._current = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing inside (used while recomputing layers for per-sample grads)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def batch_dim_of(self, layer: nn.Module) -> int:
        """0 or 1; layers that are batch-first by nature (``_dpcore_batch_first``, or as
        ``batch_first_layer`` says, e.g. EmbeddingBag whose bags are rows) always 0."""
        if self.batch_first or getattr(layer, "_dpcore_batch_first", False):
            return 0
        if self._batch_first_layer is not None and self._batch_first_layer(layer):
            return 0
        return 1

    # -- batches -------------------------------------------------------------------------
    def _close_current(self) -> None:
        cur = self._current
        if cur is not None and cur.has_grad:
            cur.drop_unused()
            self.pending.append(cur)
            self._current = None

    def has_pending(self) -> bool:
        return bool(self.pending) or (self._current is not None and self._current.has_grad)

    def take_pending(self) -> list[CapturedBatch]:
        """The completed batches (removed from the capture)."""
        self._close_current()
        batches, self.pending = self.pending, []
        return batches

    def peek_pending(self) -> list[CapturedBatch]:
        """The completed batches, left in place."""
        self._close_current()
        return list(self.pending)

    # -- hooks ---------------------------------------------------------------------------
    def _root_pre_hook(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self._paused or not torch.is_grad_enabled():
            return
        first = first_tensor((args, kwargs))
        if first is None:
            return
        dim = 0 if self.batch_first else 1
        if first.dim() <= dim:
            raise GradSampleError(
                f"the model's first input has shape {tuple(first.shape)}, with no batch "
                f"dimension {dim} (batch_first={self.batch_first})"
            )
        batch_size = first.shape[dim]
        self._close_current()
        cur = self._current
        # A forward that was never followed by backward (e.g. evaluation with grad enabled)
        # is dropped when a new batch starts; a second forward of the same batch (a model
        # called twice per step) keeps adding calls.
        if cur is None or cur.batch_size != batch_size:
            self._current = CapturedBatch(batch_size)

    def _expand_broadcast(self, layer: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """An input shared by the whole batch (position ids of shape ``[1, T]`` or ``[T]``
        in Hugging Face models) gets one row per sample, so that each sample receives its
        own output gradient: the layer's per-sample gradients are then exact instead of
        summed over the batch. The values the model computes are unchanged."""
        cur = self._current
        if self._paused or not torch.is_grad_enabled() or cur is None or cur.batch_size <= 1:
            return None
        dim, batch = self.batch_dim_of(layer), cur.batch_size
        changed, out = False, []
        for x in args:
            # (sequence-first: a 2-D input is [B, features], its dim 1 is no batch)
            if isinstance(x, Tensor) and x.dim() > max(dim, 2 * dim) and x.shape[dim] == 1:
                x = x.expand(*x.shape[:dim], batch, *x.shape[dim + 1 :])
                changed = True
            elif (
                isinstance(x, Tensor)
                and dim == 0
                and isinstance(layer, nn.Embedding)
                and x.dim() == 1
                and x.shape[0] != batch
                and not x.is_floating_point()
            ):
                x = x.unsqueeze(0).expand(batch, x.shape[0])  # 1-D ids shared by the batch
                changed = True
            out.append(x)
        return tuple(out) if changed else None

    def _forward_hook(self, layer: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self._paused or not torch.is_grad_enabled():
            return
        outputs = [t for t in pytree.tree_leaves(output) if isinstance(t, Tensor)]
        if not any(t.requires_grad for t in outputs):
            return
        if self._current is None:  # layer called outside a root forward
            first = first_tensor((args, kwargs))
            dim = self.batch_dim_of(layer)
            if first is None or first.dim() <= dim:
                raise GradSampleError(
                    f"layer {self.paths[layer]!r} was called outside the attached module's "
                    "forward and its batch size cannot be determined"
                )
            self._current = CapturedBatch(first.shape[dim])
        batch = self._current
        if batch.has_grad and not in_backward():
            # backward already ran for this batch: this is a new one. (A forward *during*
            # backward is activation checkpointing recomputing a segment: same batch.)
            self._close_current()
            batch = self._current = CapturedBatch(batch.batch_size)

        def detach(x: Any) -> Any:
            return x.detach() if isinstance(x, Tensor) else x

        d_args = tuple(pytree.tree_map(detach, a) for a in args) if self.keep_inputs else ()
        d_kwargs = pytree.tree_map(detach, kwargs) if self.keep_inputs else {}
        versions = [
            (t, t._version)
            for t in pytree.tree_leaves((d_args, d_kwargs))
            if isinstance(t, Tensor) and not t.is_inference()
        ]
        batch_dim = self.batch_dim_of(layer)
        if batch_dim == 1 and layer is not self.module and outputs[0].dim() < 3:
            # sequence-first model, but no sequence dimension here ([B, features], e.g. a
            # classifier on the last hidden state): the batch is the first dimension
            batch_dim = 0
        call = LayerCall(
            args=d_args,
            kwargs=d_kwargs,
            outputs=[t.detach() for t in outputs],
            grad_outputs=[None] * len(outputs),
            batch_dim=batch_dim,
            batch_size=batch.batch_size,
            loss_reduction=self.loss_reduction,
            versions=versions,
        )
        call.output_dims = [call.batch_dim] * len(outputs)
        batch.calls.setdefault(layer, []).append(call)
        path = self.paths[layer]
        is_root = layer is self.module
        for i, t in enumerate(outputs):
            if t.requires_grad:
                t.register_hook(self._grad_hook(call, i, path, is_root))

    @staticmethod
    def _grad_hook(call: LayerCall, index: int, path: str, is_root: bool) -> Any:
        def hook(grad: Tensor) -> None:
            dim = call.batch_dim
            size = grad.shape[dim] if grad.dim() > dim else None
            if (
                size != call.batch_size
                and is_root
                and grad.dim() > 0
                and grad.shape[0] == call.batch_size
            ):
                dim = call.output_dims[index] = 0
                size = call.batch_size
            if size != call.batch_size:
                raise GradSampleError(
                    f"layer {path!r} produced an output of shape {tuple(grad.shape)} whose "
                    f"dimension {dim} is not the batch size {call.batch_size}: its input is "
                    "shared by (broadcast over) the batch, or the model moves the batch "
                    "dimension. Per-sample gradients would be wrong. Expand shared inputs to the "
                    "batch (e.g. `pos_ids.expand(B, T)`), keep the batch dimension "
                    f"{'first' if dim == 0 else 'second'} (batch_first), or use "
                    "grad_sample_mode='functorch'."
                )
            prev = call.grad_outputs[index]
            # a second backward through the same graph adds to the gradient, as autograd does
            call.grad_outputs[index] = grad.detach() if prev is None else prev + grad.detach()

        return hook
