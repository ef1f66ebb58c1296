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
keep nothing. A tapped parameter that autograd reaches anyway is used outside its
layer (``F.linear(x, layer.weight)`` in a parent, a weight penalty in the loss): a
gradient hook notes it and the flush refuses the batch, naming the parameter.

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
from torch.utils.hooks import unserializable_hook

from .errors import GradSampleError
from .layer_sampling import MaterializingLayerGradSampler

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
    kernel: Any = None  # dpcore's fused arithmetic for this layer, if any
    own_numel: int = 0  # elements of its trainable parameters (at attach)

    def qualify(self, local: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {self.names[n]: t for n, t in local.items() if n in self.names}

    def localise(self, factors: Mapping[str, Tensor], scale: float) -> dict[str, Tensor]:
        return {
            n: factors[q] * scale if scale != 1.0 else factors[q] for n, q in self.names.items()
        }


# ----------------------------------------------------------------------------------------
# Taps: the layer's computation as one autograd function that skips weight gradients
# ----------------------------------------------------------------------------------------
def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def _trainable(layer: nn.Module, name: str) -> bool:
    p = layer._parameters.get(name)
    return p is not None and p.requires_grad


def _no_autocast(device_type: str) -> Any:
    """Autocast off inside a tap (its casts are explicit); free when it is off already."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call when it would be a no-op (hot paths)."""
    return t if t.dtype == dtype else t.to(dtype)


def _cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    if t is None or dtype is None or not t.is_floating_point():
        return t
    return _as(t, dtype)


class _Op:
    """How a tapped layer type computes its output and its input gradient."""

    #: under autocast: "low" runs in the autocast dtype (matmul-like layers), "fp32" in
    #: float32 (normalisations, as autocast does), "none" leaves inputs alone
    autocast = "low"
    #: True when ``forward`` uses only ops that autocast itself runs in the dtype above
    #: (matmuls and convolutions in the low dtype, normalisations in float32, elementwise
    #: ops and lookups untouched): with its inputs cast, running it under autocast changes
    #: nothing, and the tap skips entering a no-autocast context per call
    autocast_native = False

    @classmethod
    def dtype(cls, x: Tensor) -> torch.dtype | None:
        if cls.autocast == "none":
            return None
        low = _autocast_dtype(x)
        if low is None:
            return None
        return low if cls.autocast == "low" else torch.float32

    @staticmethod
    def forward(layer: nn.Module, x: Tensor, w: Tensor, b: Tensor | None) -> tuple[Tensor, tuple]:
        raise NotImplementedError

    @staticmethod
    def input_grad(
        layer: nn.Module, x: Tensor, w: Tensor, b: Tensor | None, extra: tuple, g: Tensor
    ) -> Tensor | None:
        raise NotImplementedError


class _LinearOp(_Op):
    autocast_native = True

    @staticmethod
    def forward(layer, x, w, b):  # type: ignore[no-untyped-def]
        return F.linear(x, w, b), ()

    @staticmethod
    def input_grad(layer, x, w, b, extra, g):  # type: ignore[no-untyped-def]
        return _as(g, w.dtype).matmul(w)


class _ConvOp(_Op):
    autocast_native = True

    @staticmethod
    def forward(layer, x, w, b):  # type: ignore[no-untyped-def]
        conv = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
        return conv(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups), ()

    @staticmethod
    def input_grad(layer, x, w, b, extra, g):  # type: ignore[no-untyped-def]
        n = x.dim() - 2
        return torch.ops.aten.convolution_backward(
            _as(g, w.dtype),
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


class _EmbeddingOp(_Op):
    autocast = "none"
    autocast_native = True

    @staticmethod
    def forward(layer, x, w, b):  # type: ignore[no-untyped-def]
        return F.embedding(x, w, layer.padding_idx), ()

    @staticmethod
    def input_grad(layer, x, w, b, extra, g):  # type: ignore[no-untyped-def]
        return None


class _LayerNormOp(_Op):
    autocast = "fp32"
    autocast_native = True

    @staticmethod
    def forward(layer, x, w, b):  # type: ignore[no-untyped-def]
        out, mean, rstd = torch.ops.aten.native_layer_norm(
            x, list(layer.normalized_shape), w, b, layer.eps
        )
        return out, (mean, rstd)

    @staticmethod
    def input_grad(layer, x, w, b, extra, g):  # type: ignore[no-untyped-def]
        mean, rstd = extra
        return torch.ops.aten.native_layer_norm_backward(
            _as(g, x.dtype),
            x,
            list(layer.normalized_shape),
            mean,
            rstd,
            w,
            b,
            [True, False, False],
        )[0]


class _GroupNormOp(_Op):
    autocast = "fp32"
    autocast_native = True

    @staticmethod
    def forward(layer, x, w, b):  # type: ignore[no-untyped-def]
        n, c = x.shape[0], x.shape[1]
        hw = x[0, 0].numel()
        out, mean, rstd = torch.ops.aten.native_group_norm(
            x.contiguous(), w, b, n, c, hw, layer.num_groups, layer.eps
        )
        return out, (mean, rstd)

    @staticmethod
    def input_grad(layer, x, w, b, extra, g):  # type: ignore[no-untyped-def]
        mean, rstd = extra
        n, c = x.shape[0], x.shape[1]
        return torch.ops.aten.native_group_norm_backward(
            _as(g, x.dtype).contiguous(),
            x.contiguous(),
            mean,
            rstd,
            w,
            n,
            c,
            x[0, 0].numel(),
            layer.num_groups,
            [True, False, False],
        )[0]


class _Tap(torch.autograd.Function):
    """``op`` on ``x`` whose backward yields only the input gradient and records (a, g)."""

    @staticmethod
    def forward(
        ctx: Any,
        core: BookkeepingSampler,
        unit: Unit,
        op: type[_Op],
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
    ) -> Tensor:
        dtype = op.dtype(x)
        xc, wc, bc = (
            _as(x, dtype) if dtype else x,
            _as(weight, dtype) if dtype else weight,
            _cast(bias, dtype),
        )
        if op.autocast_native:  # inputs already in autocast's dtype: its casts are no-ops
            out, extra = op.forward(unit.layer, xc, wc, bc)
        else:
            with _no_autocast(x.device.type):
                out, extra = op.forward(unit.layer, xc, wc, bc)
        ctx.core, ctx.unit, ctx.op, ctx.has_bias = core, unit, op, bc is not None
        ctx.save_for_backward(xc, wc, bc, *extra)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Any, ...]:
        xc, wc, bc, *extra = ctx.saved_tensors
        ctx.core._record(ctx.unit, (xc,), g)
        gx = None
        if ctx.needs_input_grad[3]:
            with _no_autocast(xc.device.type):
                gx = ctx.op.input_grad(ctx.unit.layer, xc, wc, bc, tuple(extra), g)
        return None, None, None, gx, None, None


#: Public name of the tap interface, for layer grad samplers of plugins: a sampler may
#: define ``tap_op(layer) -> TapOp subclass | None`` so that ``bk``/``ghost`` run that
#: layer through a tap (its backward returns the input gradient only and records
#: ``(a, g)``; autograd never forms the layer's weight gradient) instead of hooks.
#: ``forward(layer, x, weight, bias) -> (output, extra)`` and
#: ``input_grad(layer, x, weight, bias, extra, grad_output)``; ``autocast`` and
#: ``autocast_native`` as below.
TapOp = _Op


def _tap_op(layer: nn.Module, sampler: Any = None) -> type[_Op] | None:
    """The op of a layer the taps can run exactly, or None (then hooks record it)."""
    plugin_tap = getattr(sampler, "tap_op", None)
    if plugin_tap is not None:
        op = plugin_tap(layer)
        if op is not None:
            return op
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
    if forward is nn.LayerNorm.forward and layer.weight is not None:
        return _LayerNormOp
    if forward is nn.GroupNorm.forward and layer.weight is not None:
        return _GroupNormOp
    return None


# ----------------------------------------------------------------------------------------
# Fused kernels: dpcore's own arithmetic for the built-in samplers of tapped layers
# ----------------------------------------------------------------------------------------
def _gram(x: Tensor) -> Tensor:
    """``x xᵀ`` per sample in float32 (``x: [B, T, k]``). Low-precision inputs stay in
    their dtype with float32 accumulation and output: products of bf16/fp16 numbers are
    exact in float32, so this is as exact as upcasting first, at tensor-core speed."""
    if x.dtype in (torch.bfloat16, torch.float16) and x.is_cuda:
        try:
            return torch.bmm(x, x.mT, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    x = _as(x, torch.float32)
    return torch.bmm(x, x.mT)


def _bmm32(a: Tensor, b: Tensor) -> Tensor:
    if a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return torch.bmm(_as(a, torch.float32), _as(b, torch.float32))


_ROW_FACTORS: dict[tuple[int, torch.dtype], tuple[Tensor, Tensor]] = {}


def _row_factors(c: Tensor, dtype: torch.dtype) -> Tensor:
    """Clip factors in ``dtype``, rounded towards zero so that casting never makes a
    sample's contribution larger than the clipper allowed (cached: every layer of a
    flat-clipped model uses the same factors)."""
    if dtype == c.dtype:
        return c
    hit = _ROW_FACTORS.get((id(c), dtype))
    if hit is not None and hit[0] is c:
        return hit[1]
    low = c.to(dtype)
    low = torch.where(low.float() > c, torch.nextafter(low, torch.zeros_like(low)), low)
    if len(_ROW_FACTORS) >= 8:
        _ROW_FACTORS.clear()
    _ROW_FACTORS[(id(c), dtype)] = (c, low)  # holding c keeps its id unique
    return low


def _mm32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``, with a float32 result straight from the matrix unit for bf16/fp16."""
    if a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return a @ b


def _scaled_rows(g: Tensor, c: Tensor) -> Tensor:
    c = _row_factors(c if c.device == g.device else c.to(g.device), g.dtype)
    return g * c.view(-1, *([1] * (g.dim() - 1)))


def _ghost_is_cheaper(positions: int, param_numel: int) -> bool:
    """Ghost norm keeps two ``T x T`` Grams per sample, instantiation one ``p x d``
    gradient: pick the smaller (the rule of the built-in layer samplers)."""
    return 2 * positions * positions <= param_numel


class _LinearKernel:
    @staticmethod
    def sequences(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        if a.dim() == 3 and g.dim() == 3:
            return a, g
        batch = g.shape[0]
        if a.dim() == 2:
            return a.unsqueeze(1), g.unsqueeze(1)
        return a.reshape(batch, -1, a.shape[-1]), g.reshape(batch, -1, g.shape[-1])

    def merge(self, calls: Sequence[Call]) -> Call:
        """Several calls act as one call on the concatenated positions (exact)."""
        seqs = [self.sequences(c.inputs[0], c.grad_output) for c in calls]
        dtype = seqs[0][0].dtype
        return Call(
            (torch.cat([a.to(dtype) for a, _ in seqs], 1),), torch.cat([g for _, g in seqs], 1)
        )

    def sq_norms(self, layer: Any, a: Tensor, g: Tensor, want: set[str]) -> dict[str, Tensor]:
        a, g = self.sequences(a, g)
        positions, d, p = a.shape[1], a.shape[2], g.shape[2]
        out: dict[str, Tensor] = {}
        if positions == 1:
            g2 = _as(g, torch.float32).square().sum((1, 2))
            if "weight" in want:
                out["weight"] = _as(a, torch.float32).square().sum((1, 2)) * g2
            if "bias" in want:
                out["bias"] = g2
            return out
        gg = None
        if "weight" in want:
            if _ghost_is_cheaper(positions, p * d):
                gg = _gram(g)
                out["weight"] = (_gram(a) * gg).sum((1, 2))
            else:
                out["weight"] = _bmm32(g.mT, _as(a, g.dtype)).square().sum((1, 2))
        if "bias" in want:
            # ||Σ_t g_t||² = Σ_{t,s} g_t·g_s: from the Gram when there is one (T² reads, not T·p)
            out["bias"] = (
                gg.sum((1, 2)) if gg is not None else g.sum(1, dtype=torch.float32).square().sum(1)
            )
        return out

    def per_sample_grads(
        self, layer: Any, a: Tensor, g: Tensor, want: set[str]
    ) -> dict[str, Tensor]:
        a, g = self.sequences(a, g)
        out: dict[str, Tensor] = {}
        if "weight" in want:
            out["weight"] = _bmm32(g.mT, _as(a, g.dtype))
        if "bias" in want:
            out["bias"] = g.sum(1, dtype=torch.float32)
        return out

    def clipped_sums(
        self,
        layer: Any,
        a: Tensor,
        g: Tensor,
        factors: Mapping[str, Tensor],
        in_out: bool = False,
    ) -> dict[str, Tensor]:
        """``Σ_i c_i Σ_t g_it a_itᵀ`` as ``[out, in]`` (``in_out``: ``[in, out]``, as
        Conv1D stores it, computed in that layout rather than transposed afterwards)."""
        a, g = self.sequences(a, g)
        a = _as(a, g.dtype)
        out: dict[str, Tensor] = {}
        cw = factors.get("weight")
        if cw is not None:
            # c scales a sample's rows of a or of g alike: scale the narrower of the two
            if a.shape[-1] < g.shape[-1]:
                a2, g2 = _scaled_rows(a, cw).flatten(0, 1), g.flatten(0, 1)
            else:
                a2, g2 = a.flatten(0, 1), _scaled_rows(g, cw).flatten(0, 1)
            out["weight"] = _mm32(a2.mT, g2) if in_out else _mm32(g2.mT, a2)
        cb = factors.get("bias")
        if cb is not None:
            per_sample = g.sum(1, dtype=torch.float32)
            out["bias"] = per_sample.mT @ cb.to(device=g.device, dtype=torch.float32)
        return out


class _EmbeddingKernel:
    #: above this many positions per sample the T x T mask costs more than sorting
    max_positions = 1024

    def merge(self, calls: Sequence[Call]) -> Call:
        batch = calls[0].grad_output.shape[0]
        ids = torch.cat([c.inputs[0].reshape(batch, -1) for c in calls], 1)
        dim = calls[0].grad_output.shape[-1]
        return Call((ids,), torch.cat([c.grad_output.reshape(batch, -1, dim) for c in calls], 1))

    def sq_norms(
        self, layer: Any, ids: Tensor, g: Tensor, want: set[str]
    ) -> dict[str, Tensor] | None:
        batch = g.shape[0]
        ids = ids.reshape(batch, -1)
        if ids.shape[1] > self.max_positions:
            return None
        g = g.reshape(batch, ids.shape[1], -1)
        # ||Σ_t e_{id_t} g_tᵀ||² = Σ_{t,s} [id_t = id_s] g_t·g_s: no sort, no host sync
        same = ids[:, :, None] == ids[:, None, :]
        if layer.padding_idx is not None:
            keep = ids != layer.padding_idx
            same = same & keep[:, :, None] & keep[:, None, :]
        return {"weight": (_gram(g) * same).sum((1, 2))}

    def clipped_sums(
        self, layer: Any, ids: Tensor, g: Tensor, factors: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        batch, dim = g.shape[0], g.shape[-1]
        rows = _scaled_rows(g.reshape(batch, -1, dim), factors["weight"]).reshape(-1, dim)
        # autograd's own kernel for an embedding's weight gradient: sorted, deterministic
        # (index_add_ adds repeated ids with atomics, in a different order every run)
        padding_idx = layer.padding_idx if layer.padding_idx is not None else -1
        out = torch.ops.aten.embedding_dense_backward(
            _as(rows, torch.float32), ids.reshape(-1), layer.num_embeddings, padding_idx, False
        )
        return {"weight": out}


class _ConvKernel:
    @staticmethod
    def supports(layer: Any) -> bool:
        return layer.weight.dim() in (3, 4) and layer.groups == 1

    @staticmethod
    def patches(layer: Any, x: Tensor) -> Tensor:
        """``[B, L, C_in·Πk]``: the input patch behind every output position, in the
        order of ``weight.view(C_out, -1)``. Built from strided views and one copy
        (``F.unfold`` on CUDA launches one kernel per sample)."""
        if x.dim() == 3:  # 1-D convolution as a 2-D one of height 1
            x = x.unsqueeze(2)
            k, d, p, s = (
                (1, *layer.kernel_size),
                (1, *layer.dilation),
                (0, *layer.padding),
                (1, *layer.stride),
            )
        else:
            k, d, p, s = layer.kernel_size, layer.dilation, layer.padding, layer.stride
        if any(p):
            x = F.pad(x, (p[1], p[1], p[0], p[0]))
        x = x.unfold(2, d[0] * (k[0] - 1) + 1, s[0]).unfold(3, d[1] * (k[1] - 1) + 1, s[1])
        if d[0] > 1 or d[1] > 1:
            x = x[..., :: d[0], :: d[1]]
        batch, channels, rows, cols = x.shape[:4]
        return x.permute(0, 2, 3, 1, 4, 5).reshape(batch, rows * cols, channels * k[0] * k[1])

    def sq_norms(self, layer: Any, x: Tensor, g: Tensor, want: set[str]) -> dict[str, Tensor]:
        batch, c_out = g.shape[0], g.shape[1]
        g = g.reshape(batch, c_out, -1)  # [B, p, L]
        out: dict[str, Tensor] = {}
        if "weight" in want:
            a = self.patches(layer, x)  # [B, L, d]
            positions = a.shape[1]
            if _ghost_is_cheaper(positions, layer.weight.numel()):
                out["weight"] = (_gram(a) * _gram(g.mT)).sum((1, 2))
            else:
                out["weight"] = _bmm32(g, _as(a, g.dtype)).square().sum((1, 2))
        if "bias" in want:
            out["bias"] = g.sum(2, dtype=torch.float32).square().sum(1)
        return out

    def per_sample_grads(
        self, layer: Any, x: Tensor, g: Tensor, want: set[str]
    ) -> dict[str, Tensor]:
        batch, c_out = g.shape[0], g.shape[1]
        g = g.reshape(batch, c_out, -1)
        out: dict[str, Tensor] = {}
        if "weight" in want:
            a = self.patches(layer, x)
            out["weight"] = _bmm32(g, _as(a, g.dtype)).view(batch, *layer.weight.shape)
        if "bias" in want:
            out["bias"] = g.sum(2, dtype=torch.float32)
        return out

    def clipped_sums(
        self, layer: Any, x: Tensor, g: Tensor, factors: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        cw, cb = factors.get("weight"), factors.get("bias")
        gw = None
        if cw is not None:
            gw = _scaled_rows(g, cw)
            n = x.dim() - 2
            w = _as(layer.weight, gw.dtype)
            out["weight"] = torch.ops.aten.convolution_backward(
                gw,
                _as(x, gw.dtype),
                w,
                None,
                list(layer.stride),
                list(layer.padding),
                list(layer.dilation),
                False,
                [0] * n,
                layer.groups,
                [False, True, False],
            )[1]
        if cb is not None:
            gb = gw if cb is cw and gw is not None else _scaled_rows(g, cb)
            out["bias"] = gb.flatten(2).sum((0, 2), dtype=torch.float32)
        return out


_KERNELS: dict[type[_Op], Any] = {
    _LinearOp: _LinearKernel(),
    _EmbeddingOp: _EmbeddingKernel(),
    _ConvOp: _ConvKernel(),
}


def _kernel_for(layer: nn.Module, op: type[_Op] | None, sampler: Any) -> Any | None:
    """dpcore's fused arithmetic, only where the registry resolved the layer to dpcore's
    own sampler (a plugin's sampler for a subclass is always honoured)."""
    if op is None or not type(sampler).__module__.startswith("dpcore.builtins."):
        return None
    kernel = _KERNELS.get(op)
    if kernel is None or not getattr(kernel, "supports", lambda _: True)(layer):
        return None
    return kernel


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
        self._factor_cache: dict[int, tuple[Tensor, Tensor]] = {}
        #: tapped parameters autograd computed a gradient for in the pending batch
        self._outside_uses: set[str] = set()
        #: tied embedding/head unit pairs of the current batch
        self._tied: list[tuple[Unit, Unit]] = []

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
            op = _tap_op(layer, sampler)
            bdim = 0 if batch_first or getattr(layer, "_dpcore_batch_first", False) else 1
            unit = Unit(
                path,
                layer,
                sampler,
                {n: qualified[id(p)] for n, p in own.items()},
                tapped=op is not None,
                batch_dim=bdim,
                kernel=_kernel_for(layer, op, sampler),
                own_numel=sum(p.numel() for p in own.values()),
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
        self._watch_outside_uses()

    def _watch_outside_uses(self) -> None:
        """Taps never let autograd form the gradient of their layer's parameters, so
        autograd reaching such a parameter means a use outside its layer
        (``F.linear(x, layer.weight)`` in a parent, a weight penalty in the loss) that the
        per-sample gradients miss. A gradient hook notes it at no cost per step (no device
        sync, and it works whether ``zero_grad`` sets gradients to None or to zero); the
        flush refuses the batch. Parameters also owned by a hooked layer are skipped:
        autograd forms their gradients legitimately."""
        hooked = {id(p) for u in self.units if not u.tapped for p in u.layer.parameters(False)}
        watched: dict[int, str] = {}
        for unit in self.units:
            if unit.tapped:
                for local, name in unit.names.items():
                    p = unit.layer._parameters[local]
                    if p is not None and id(p) not in hooked:
                        watched[id(p)] = name
        for name, p in self._params.items():
            if id(p) in watched:
                self._handles.append(p.register_hook(self._outside_use_hook(name)))

    def _outside_use_hook(self, name: str) -> Any:
        @unserializable_hook
        def hook(grad: Tensor | None) -> None:
            # a tap's backward gives its parameters no gradient: the hook sees None
            if grad is not None and not self._paused:
                self._outside_uses.add(name)

        return hook

    def _check_outside_uses(self) -> None:
        """Refuse a batch in which a tapped parameter was used outside its layer."""
        if not self._outside_uses:
            return
        names = sorted(self._outside_uses)
        self.clear()
        raise GradSampleError(
            f"parameter(s) {', '.join(repr(n) for n in names[:5])} are used outside the layer "
            "that owns them (e.g. F.linear(x, self.layer.weight) in a parent's forward, or a "
            "weight penalty added to the loss): autograd computed a gradient for them that the "
            "per-sample gradients of grad sampler 'bk'/'ghost' do not include, so the private "
            "update would silently drop that use. Use every parameter through its own module "
            "(and the optimizer's weight_decay instead of a penalty in the loss), or use "
            "grad_sample_mode='hooks' (its check_sums verifies every parameter's per-sample "
            "gradients against autograd) or 'functorch' (per-sample gradients of the whole "
            "forward pass)."
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
        if batch == 0:  # an empty batch contributes nothing: zero norms rows, zero sums
            return
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

    def _fast(self, unit: Unit) -> Call | None:
        """The unit's calls as one call for the layer's sampler, or None when they must be
        materialised (several calls that cannot be merged, shared parameters)."""
        if unit.shared or not unit.calls:
            return None
        if len(unit.calls) > 1:
            kernel_merge = getattr(unit.kernel, "merge", None)
            if kernel_merge is not None:
                unit.calls = [kernel_merge(unit.calls)]
            else:
                merge = getattr(unit.sampler, "merge_calls", None)
                if merge is None:
                    return None
                inputs, g = merge([(c.inputs, c.grad_output) for c in unit.calls])
                unit.calls = [Call(tuple(inputs), g)]
        return unit.calls[0]

    def _unit_sq_norms(self, unit: Unit, scaled: bool = True) -> dict[str, Tensor]:
        """Per-sample squared norms of a unit's parameters (scaled unless ``scaled`` is
        False: then the caller multiplies all units' norms by ``_scale²`` at once);
        materialised contributions go to ``self._materialised`` and are reduced later."""
        call = self._fast(unit)
        s2 = self._scale**2 if scaled else 1.0
        if call is not None:
            sq = None
            if unit.kernel is not None:
                want = {n for n in unit.names if _trainable(unit.layer, n)}
                sq = unit.kernel.sq_norms(unit.layer, call.inputs[0], call.grad_output, want)
            if sq is None:
                with self.paused():
                    sq = unit.sampler.per_sample_sq_norms(unit.layer, call.inputs, call.grad_output)
            return {
                q: _as(v, torch.float32) * s2 if s2 != 1.0 else _as(v, torch.float32)
                for q, v in unit.qualify(sq).items()
            }
        with self.paused():
            for c in unit.calls:
                grads = unit.sampler.per_sample_grads(unit.layer, c.inputs, c.grad_output)
                for q, gs in unit.qualify(grads).items():
                    prev = self._materialised.get(q)
                    self._materialised[q] = gs if prev is None else prev + gs
        return {}

    def _materialised_sq_norms(self, scaled: bool = True) -> dict[str, Tensor]:
        s2 = self._scale**2 if scaled else 1.0
        out = {}
        for q, g in self._materialised.items():
            sq = _as(g.flatten(1), torch.float32).square().sum(1)
            out[q] = sq * s2 if s2 != 1.0 else sq
        return out

    def _unit_clipped_sums(self, unit: Unit, factors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        call = self._fast(unit)
        if call is None:
            return {}  # materialised: reduced in _materialised_clipped_sums
        local = self._local_factors(unit, factors)
        if unit.kernel is not None:
            sums = unit.kernel.clipped_sums(unit.layer, call.inputs[0], call.grad_output, local)
        else:
            with self.paused():
                sums = unit.sampler.clipped_sums(unit.layer, call.inputs, call.grad_output, local)
        return unit.qualify(sums)

    def _local_factors(self, unit: Unit, factors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Factors by local name, times the mean-reduction scale; one tensor per distinct
        factor tensor (a flat clipper gives every parameter the same one)."""
        scale, cache = self._scale, self._factor_cache
        out = {}
        for local, q in unit.names.items():
            if not _trainable(unit.layer, local):
                continue
            f = factors[q]
            hit = cache.get(id(f))
            if hit is None:  # (scaled, f): keeping f alive keeps its id unique
                hit = cache[id(f)] = (f * scale if scale != 1.0 else f, f)
            out[local] = hit[0]
        return out

    def _materialised_clipped_sums(self, factors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        scale, cache = self._scale, self._factor_cache
        out = {}
        for q, g in self._materialised.items():
            f = factors[q]
            hit = cache.get(id(f))
            if hit is None:  # one scaled tensor per distinct factor tensor (see above)
                hit = cache[id(f)] = (f * scale if scale != 1.0 else f, f)
            c = hit[0]
            # one matrix-vector product: Σ_i c_i g_i
            out[q] = (_as(c, g.dtype) @ g.flatten(1)).view(g.shape[1:])
        return out

    def _complete(self, norms: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every covered parameter gets a norm (zeros where it got no gradient)."""
        batch = self._batch_size or 0
        out = {}
        for name, p in self._params.items():
            v = norms.get(name)
            out[name] = v if v is not None else torch.zeros(batch, device=p.device)
        return out

    # -- tied input/output embeddings (a language model's head sharing the embedding) ------
    def _tied_pairs(self) -> list[tuple[Unit, Unit]]:
        """``(embedding unit, linear unit)`` pairs whose only shared parameter is one weight
        used by exactly these two layers, both run by dpcore's kernels, both recorded
        (not instantiated eagerly): GPT-2's ``wte`` and ``lm_head``."""
        users: dict[int, list[Unit]] = {}
        for unit in self.units:
            if unit.shared:
                for local in unit.names:
                    users.setdefault(id(unit.layer._parameters[local]), []).append(unit)
        pairs = []
        eager = getattr(self, "_eager", {})
        for units in users.values():
            if len(units) != 2:
                continue
            emb = next((u for u in units if isinstance(u.kernel, _EmbeddingKernel)), None)
            lin = next((u for u in units if isinstance(u.kernel, _LinearKernel)), None)
            if emb is None or lin is None or emb.layer.weight is not lin.layer.weight:
                continue
            if any(eager.get(id(u)) for u in (emb, lin)) or not (emb.calls or lin.calls):
                continue
            if sum(len(users.get(id(p), ())) > 1 for p in lin.layer.parameters(False)) != 1:
                continue  # the head shares more than its weight
            pairs.append((emb, lin))
        return pairs

    def _tied_sq_norms(self, emb: Unit, lin: Unit) -> dict[str, Tensor] | None:
        """``||G_emb + G_lin||² = ||G_emb||² + ||G_lin||² + 2<G_emb, G_lin>`` per sample,
        with ``<G_emb, G_lin> = Σ_{t,s} g_lin[s, id_t] (g_emb[t] · a[s])`` (``T x S``
        per sample): no ``V x D`` per-sample gradient is formed. None: materialise."""
        for unit in (emb, lin):
            if len(unit.calls) > 1:
                unit.calls = [unit.kernel.merge(unit.calls)]
        name = emb.names["weight"]
        want = {"weight"}
        norms: dict[str, Tensor] = {}
        if emb.calls:
            ids, ge = emb.calls[0].inputs[0], emb.calls[0].grad_output
            sq = emb.kernel.sq_norms(emb.layer, ids, ge, want)
            if sq is None:
                return None
            norms[name] = _as(sq["weight"], torch.float32)
        if lin.calls:
            a, gl = lin.calls[0].inputs[0], lin.calls[0].grad_output
            lin_want = {n for n in lin.names if _trainable(lin.layer, n)}
            for local, v in lin.kernel.sq_norms(lin.layer, a, gl, lin_want).items():
                q = lin.names[local]
                norms[q] = norms[q] + _as(v, torch.float32) if q in norms else _as(v, torch.float32)
        if emb.calls and lin.calls:
            batch = ge.shape[0]
            ids = ids.reshape(batch, -1)
            ge = ge.reshape(batch, ids.shape[1], -1)
            a, gl = _LinearKernel.sequences(a, gl)
            mixed = _bmm32(ge, a.mT.to(ge.dtype))  # [B, T, S]: g_emb[t] · a[s]
            picked = gl.gather(2, ids[:, None, :].expand(batch, gl.shape[1], ids.shape[1]))
            cross = mixed * _as(picked.mT, torch.float32)  # [B, T, S]
            padding_idx = emb.layer.padding_idx
            if isinstance(padding_idx, int):
                cross = cross * ids.ne(padding_idx)[:, :, None]
            norms[name] = norms[name] + 2 * cross.sum((1, 2))
        s2 = self._scale**2
        return {q: v * s2 for q, v in norms.items()} if s2 != 1.0 else norms

    def _tied_clipped_sums(
        self, emb: Unit, lin: Unit, factors: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Both uses' clipped sums, added (one factor per sample for the shared weight)."""
        out: dict[str, Tensor] = {}
        for unit in (emb, lin):
            if not unit.calls:
                continue
            if len(unit.calls) > 1:
                unit.calls = [unit.kernel.merge(unit.calls)]
            call = unit.calls[0]
            local = self._local_factors(unit, factors)
            sums = unit.kernel.clipped_sums(unit.layer, call.inputs[0], call.grad_output, local)
            for q, v in unit.qualify(sums).items():
                v = _as(v, torch.float32)
                out[q] = out[q] + v if q in out else v
        return out

    def _recorded_clipped_sums(
        self, factors: Mapping[str, Tensor], sums: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Clipped sums from what the backward pass recorded (tied pairs, tapped units,
        materialised layers), added to ``sums``, completed with zeros and cleared."""
        sums = {} if sums is None else sums
        tied_units = {id(u) for pair in self._tied for u in pair}
        for emb, lin in self._tied:
            sums.update(self._tied_clipped_sums(emb, lin, factors))
        for unit in self.units:
            if unit.calls and id(unit) not in tied_units:
                sums.update(self._unit_clipped_sums(unit, factors))
        sums.update(self._materialised_clipped_sums(factors))
        out = self._complete_sums(sums)
        self.clear()
        return out

    def _complete_sums(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name, p in self._params.items():
            v = sums.get(name)
            out[name] = torch.zeros_like(p) if v is None else _as(v, p.dtype)
        return out

    def clear(self) -> None:
        for unit in self.units:
            unit.calls.clear()
        self._materialised = {}
        self._factor_cache = {}
        self._batch_size = None
        self._outside_uses = set()
