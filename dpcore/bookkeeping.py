"""Machinery shared by the fast grad samplers ``bk`` (book-keeping) and ``ghost``.

Both answer the pipeline's two questions from each layer's activation ``a`` and
output gradient ``g`` (the :class:`~dpcore.protocols.LayerGradSampler` of the
layer turns them into per-sample norms and clipped sums), and never let autograd
compute the unclipped weight gradients it would throw away.

**Taps.** ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.Embedding`` instances get
their ``forward`` replaced (on the instance; :meth:`BookkeepingSampler.detach`
restores it) by a custom autograd function. Its backward returns the gradient of
the layer's *input* only and hands ``(a, g)`` to the sampler, so the weight
gradient is never formed. Every other layer with trainable parameters is
recorded by hooks (forward hook for the inputs, a tensor hook on the output for
its gradient); autograd computes its (small) parameter gradients as usual and
they are ignored. Layers with no registered layer grad sampler use
:class:`FunctionalLayerGradSampler` (``torch.func``) for that layer alone.

**Exactness.** A layer called several times in one forward, or a parameter shared
by several layers, gets the sum of its contributions per sample: linear calls
are merged into one longer sequence (exact for ghost norms too), anything else
is materialised per sample and summed. An input broadcast over the batch (e.g.
position ids of shape ``[1, T]``) is expanded to the batch at tapped layers, so
each sample gets its own output gradient. Frozen layers are not touched and
keep nothing.

**Costs.** ``loss_reduction="mean"`` is handled by scaling norms by ``B²`` and
clip factors by ``B`` instead of copying every output gradient.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .errors import GradSampleError
from .layer_sampling import MaterializingLayerGradSampler, sq_norms_of, weighted_sums

LossReduction = Literal["mean", "sum"]


# ----------------------------------------------------------------------------------------
# Fallback layer sampler: torch.func over one layer
# ----------------------------------------------------------------------------------------
class FunctionalLayerGradSampler(MaterializingLayerGradSampler):
    """Per-sample gradients of any layer's own parameters by ``vmap(grad)`` over it."""

    def per_sample_grads(
        self, layer: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor
    ) -> dict[str, Tensor]:
        from torch.func import functional_call, grad, vmap

        params = {
            n: p.detach() for n, p in layer.named_parameters(recurse=False) if p.requires_grad
        }

        def loss(p: dict[str, Tensor], g: Tensor, *xs: Tensor) -> Tensor:
            out = functional_call(layer, p, tuple(x.unsqueeze(0) for x in xs))
            return (out * g.unsqueeze(0)).sum()

        dims = (None, 0, *([0] * len(inputs)))
        return vmap(grad(loss), in_dims=dims)(params, grad_output, *inputs)


# ----------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------
@dataclass
class Call:
    """One call of one layer: inputs and output gradient, batch dimension first."""

    inputs: tuple[Tensor, ...]
    grad_output: Tensor


@dataclass
class Unit:
    """A module that directly owns trainable parameters."""

    path: str
    layer: nn.Module
    sampler: Any  # LayerGradSampler
    names: dict[str, str]  # local parameter name -> qualified name
    tapped: bool
    batch_dim: int
    calls: list[Call] = field(default_factory=list)
    shared: bool = False  # owns a parameter that another unit also uses

    def qualify(self, local: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {self.names[n]: t for n, t in local.items() if n in self.names}

    def localise(self, factors: Mapping[str, Tensor], scale: float) -> dict[str, Tensor]:
        return {
            n: factors[q] * scale if scale != 1.0 else factors[q] for n, q in self.names.items()
        }


# ----------------------------------------------------------------------------------------
# Taps: the layer's computation as one autograd function that skips weight gradients
# ----------------------------------------------------------------------------------------
def _compute_dtype(x: Tensor) -> torch.dtype | None:
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def _cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    if t is None or dtype is None or not t.is_floating_point():
        return t
    return t.to(dtype)


class _LinearOp:
    @staticmethod
    def forward(layer: nn.Module, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.linear(x, w, b)

    @staticmethod
    def input_grad(layer: nn.Module, x: Tensor, w: Tensor, g: Tensor) -> Tensor:
        return g.to(w.dtype).matmul(w)


class _ConvOp:
    @staticmethod
    def forward(layer: nn.Module, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
        return conv(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)

    @staticmethod
    def input_grad(layer: nn.Module, x: Tensor, w: Tensor, g: Tensor) -> Tensor:
        n = x.dim() - 2
        return torch.ops.aten.convolution_backward(
            g.to(w.dtype),
            x,
            w,
            None,
            list(layer.stride),
            list(layer.padding),
            list(layer.dilation),
            False,
            [0] * n,
            layer.groups,
            [True, False, False],
        )[0]


class _EmbeddingOp:
    @staticmethod
    def forward(layer: nn.Module, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.embedding(x, w, layer.padding_idx)

    @staticmethod
    def input_grad(layer: nn.Module, x: Tensor, w: Tensor, g: Tensor) -> Tensor | None:
        return None


class _Tap(torch.autograd.Function):
    """``op`` on ``x`` whose backward yields only the input gradient and records (a, g)."""

    @staticmethod
    def forward(
        ctx: Any,
        core: BookkeepingSampler,
        unit: Unit,
        op: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
    ) -> Tensor:
        dtype = _compute_dtype(x) if op is not _EmbeddingOp else None
        xc, wc, bc = _cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype)
        with torch.autocast(x.device.type, enabled=False):
            out = op.forward(unit.layer, xc, wc.detach(), None if bc is None else bc.detach())
        ctx.core, ctx.unit, ctx.op = core, unit, op
        ctx.save_for_backward(xc, wc)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Any, ...]:
        xc, wc = ctx.saved_tensors
        ctx.core._record(ctx.unit, (xc,), g)
        gx = None
        if ctx.needs_input_grad[3]:
            with torch.autocast(xc.device.type, enabled=False):
                gx = ctx.op.input_grad(ctx.unit.layer, xc, wc, g)
        return None, None, None, gx, None, None


def _tap_op(layer: nn.Module) -> Any | None:
    """The op of a layer the taps can run exactly, or None (then hooks record it)."""
    forward = type(layer).forward
    if forward is nn.Linear.forward:
        return _LinearOp
    if forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward):
        if layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
            return _ConvOp
        return None
    if forward is nn.Embedding.forward:
        if layer.max_norm is None and not layer.scale_grad_by_freq and not layer.sparse:
            return _EmbeddingOp
    return None


# ----------------------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------------------
class BookkeepingSampler:
    """Base of ``bk`` and ``ghost``: attach, record, and the per-layer arithmetic.

    Subclasses decide *when* records are consumed (``bk``: after the user's
    backward; ``ghost``: during its own two backward passes).
    """

    def __init__(self) -> None:
        self.module: nn.Module | None = None
        self.units: list[Unit] = []
        self.batch_first = True
        self.loss_reduction: LossReduction = "mean"
        self._params: dict[str, nn.Parameter] = {}
        self._handles: list[Any] = []
        self._root_batch: int | None = None
        self._paused = 0
        self._batch_size: int | None = None
        self._materialised: dict[str, Tensor] = {}

    # -- attach / detach -------------------------------------------------------------------
    def attach(
        self, module: nn.Module, *, batch_first: bool = True, loss_reduction: LossReduction = "mean"
    ) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise GradSampleError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if self.module is not None:
            raise GradSampleError("this grad sampler is already attached; detach() it first")
        from .registry import get_registry

        registry = get_registry()
        self.module, self.batch_first, self.loss_reduction = module, batch_first, loss_reduction
        qualified = {id(p): n for n, p in module.named_parameters() if p.requires_grad}
        self._params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        owners: dict[int, int] = {}
        fallback = FunctionalLayerGradSampler()
        for path, layer in module.named_modules(remove_duplicate=False):
            own = {n: p for n, p in layer._parameters.items() if p is not None and p.requires_grad}
            if not own or any(u.layer is layer for u in self.units):
                continue
            sampler = registry.layer_grad_sampler_for(layer) or fallback
            op = _tap_op(layer)
            bdim = 0 if batch_first or getattr(layer, "_dpcore_batch_first", False) else 1
            unit = Unit(
                path,
                layer,
                sampler,
                {n: qualified[id(p)] for n, p in own.items()},
                tapped=op is not None,
                batch_dim=bdim,
            )
            for p in own.values():
                if id(p) in owners:
                    unit.shared = True
                    self.units[owners[id(p)]].shared = True
                owners.setdefault(id(p), len(self.units))
            self.units.append(unit)
            if op is not None:
                layer.forward = types.MethodType(self._tapped_forward(unit, op), layer)
            else:
                self._handles.append(layer.register_forward_hook(self._hook_forward(unit)))
        self._handles.append(
            module.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True)
        )

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for unit in self.units:
            if unit.tapped:
                with contextlib.suppress(AttributeError):
                    del unit.layer.forward
        self.clear()
        self.units = []
        self.module = None

    def named_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self._params)

    # -- recording -------------------------------------------------------------------------
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Run the model without recording (e.g. inside the functional fallback)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _recording(self) -> bool:
        return not self._paused and torch.is_grad_enabled()

    def _root_pre_hook(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if not self._recording():
            return
        dim = 0 if self.batch_first else 1
        for leaf in pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, Tensor) and leaf.dim() > dim:
                self._root_batch = leaf.shape[dim]
                return

    def _expand_broadcast(self, unit: Unit, x: Tensor) -> Tensor:
        """An input shared by the whole batch gets one row per sample, so that each
        sample receives its own output gradient (exact per-sample gradients)."""
        batch, dim = self._root_batch, unit.batch_dim
        if batch is None or batch == 1:
            return x
        if x.dim() > dim and x.shape[dim] == 1:
            return x.expand(*x.shape[:dim], batch, *x.shape[dim + 1 :])
        if dim == 0 and x.dim() == 1 and x.shape[0] != batch and not x.is_floating_point():
            return x.unsqueeze(0).expand(batch, x.shape[0])  # 1-D ids shared by the batch
        return x

    def _tapped_forward(self, unit: Unit, op: Any) -> Any:
        original = type(unit.layer).forward
        core = self

        def forward(layer: nn.Module, x: Tensor) -> Tensor:
            weight = layer.weight
            bias = layer._parameters.get("bias")
            live = weight.requires_grad or (bias is not None and bias.requires_grad)
            if not (live and core._recording()):
                return original(layer, x)
            x = core._expand_broadcast(unit, x)
            return _Tap.apply(core, unit, op, x, weight, bias)

        return forward

    def _hook_forward(self, unit: Unit) -> Any:
        def hook(layer: nn.Module, args: Any, output: Any) -> None:
            if not self._recording():
                return
            if not isinstance(output, Tensor):
                raise GradSampleError(
                    f"layer {unit.path!r} ({type(layer).__name__}) returns "
                    f"{type(output).__name__}, not one tensor, so grad sampler "
                    "'bk'/'ghost' cannot record its output gradient; use "
                    "grad_sample_mode='hooks' or 'functorch' for this model"
                )
            if not output.requires_grad:
                return
            inputs = tuple(a.detach() for a in args if isinstance(a, Tensor))

            def grad_hook(g: Tensor) -> None:
                self._record(unit, inputs, g)

            output.register_hook(grad_hook)

        return hook

    def _to_front(self, unit: Unit, t: Tensor) -> Tensor:
        return t.movedim(1, 0) if unit.batch_dim == 1 and t.dim() > 1 else t

    def _record(self, unit: Unit, inputs: tuple[Tensor, ...], g: Tensor) -> None:
        g = self._to_front(unit, g.detach())
        batch = g.shape[0] if g.dim() else None
        expected = self._batch_size if self._batch_size is not None else self._root_batch
        if batch is None or (expected is not None and batch != expected):
            raise GradSampleError(
                f"layer {unit.path!r} produced an output of shape {tuple(g.shape)} whose batch "
                f"dimension is not the batch size {expected}: its input is shared by (broadcast "
                "over) the batch, or the model moves the batch dimension. Per-sample gradients "
                "would be wrong. Expand shared inputs to the batch (e.g. `pos_ids.expand(B, T)`)"
                ", or keep the batch dimension first (batch_first)."
            )
        self._batch_size = batch
        call = Call(tuple(self._to_front(unit, x) for x in inputs), g)
        self._consume(unit, call)

    def _consume(self, unit: Unit, call: Call) -> None:
        """What to do with a finished call (``bk`` keeps it until clipping)."""
        unit.calls.append(call)

    # -- the arithmetic ------------------------------------------------------------------------
    @property
    def _scale(self) -> float:
        """Factor turning the recorded gradients into per-sample ones."""
        if self.loss_reduction == "mean" and self._batch_size:
            return float(self._batch_size)
        return 1.0

    def _fast(self, unit: Unit) -> tuple[tuple[Tensor, ...], Tensor] | None:
        """``(inputs, grad_output)`` to hand the layer sampler in one call, or None when
        the unit's calls must be materialised (several calls, shared parameters)."""
        if unit.shared or not unit.calls:
            return None
        if len(unit.calls) == 1:
            return unit.calls[0].inputs, unit.calls[0].grad_output
        merge = getattr(unit.sampler, "merge_calls", None)
        if merge is None:
            return None
        inputs, g = merge([(c.inputs, c.grad_output) for c in unit.calls])
        unit.calls = [Call(tuple(inputs), g)]
        return unit.calls[0].inputs, g

    def _unit_sq_norms(self, unit: Unit) -> dict[str, Tensor]:
        """Per-sample squared norms of a unit's parameters (scaled); materialised
        contributions go to ``self._materialised`` and are reduced later."""
        fast = self._fast(unit)
        s2 = self._scale**2
        if fast is not None:
            sq = unit.sampler.per_sample_sq_norms(unit.layer, fast[0], fast[1])
            return {q: v.float() * s2 for q, v in unit.qualify(sq).items()}
        with self.paused():
            for call in unit.calls:
                grads = unit.sampler.per_sample_grads(unit.layer, call.inputs, call.grad_output)
                for q, gs in unit.qualify(grads).items():
                    prev = self._materialised.get(q)
                    self._materialised[q] = gs if prev is None else prev + gs
        return {}

    def _materialised_sq_norms(self) -> dict[str, Tensor]:
        s2 = self._scale**2
        return {q: v * s2 for q, v in sq_norms_of(self._materialised).items()}

    def _unit_clipped_sums(self, unit: Unit, factors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        fast = self._fast(unit)
        if fast is None:
            return {}  # materialised: reduced in _materialised_clipped_sums
        local = unit.localise(factors, self._scale)
        sums = unit.sampler.clipped_sums(unit.layer, fast[0], fast[1], local)
        return unit.qualify(sums)

    def _materialised_clipped_sums(self, factors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        scale = self._scale
        scaled = {q: factors[q] * scale for q in self._materialised}
        return weighted_sums(self._materialised, scaled)

    def _complete(self, norms: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every covered parameter gets a norm (zeros where it got no gradient)."""
        batch = self._batch_size or 0
        out = {}
        for name, p in self._params.items():
            v = norms.get(name)
            out[name] = v if v is not None else torch.zeros(batch, device=p.device)
        return out

    def _complete_sums(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name, p in self._params.items():
            v = sums.get(name)
            out[name] = torch.zeros_like(p) if v is None else v.to(p.dtype)
        return out

    def clear(self) -> None:
        for unit in self.units:
            unit.calls.clear()
        self._materialised = {}
        self._batch_size = None
