"""``hooks``: per-sample gradients layer by layer from recorded activations.

Forward hooks record each trainable layer's inputs, tensor hooks its output
gradients (:class:`dpcore.capture.ActivationCapture`); at flush time the layer
grad sampler registered for the layer's type turns them into per-sample
gradients. Layers without one fall back to ``torch.func`` for that layer alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from dpcore.capture import (
    ActivationCapture,
    CapturedBatch,
    LayerCall,
    LossReduction,
    exact_layer_sampler,
    trainable_layers,
)
from dpcore.errors import GradSampleError
from dpcore.registry import get_registry

from ._base import MaterializingGradSampler, MaterializingOptions
from .functorch import per_sample_grads_of_call


@lru_cache(maxsize=256)
def _signature(layer_type: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(layer_type.forward)
    except (TypeError, ValueError):
        return None


def positional_inputs(layer: nn.Module, call: LayerCall) -> tuple[Any, ...]:
    """The call's arguments as positional inputs, batch dimension first (keyword
    arguments such as ``offsets=`` are bound to their positions)."""
    args = call.batched_args()
    if not call.kwargs:
        return args
    sig = _signature(type(layer))  # type: ignore[arg-type]
    if sig is None:
        return args
    bound = sig.bind(layer, *call.args, **call.kwargs)
    bound.apply_defaults()
    moved = LayerCall(
        args=tuple(bound.args[1:]),
        kwargs={},
        outputs=call.outputs,
        grad_outputs=call.grad_outputs,
        batch_dim=call.batch_dim,
        batch_size=call.batch_size,
        loss_reduction=call.loss_reduction,
    )
    return moved.batched_args()


class HooksOptions(MaterializingOptions):
    """Options of ``hooks``."""

    check_sums: bool = Field(
        default=True,
        description="check at every flush that each parameter's per-sample gradients add up "
        "to the gradient autograd computed for it; catches parameters used outside the layer "
        "that owns them and loss terms without a per-sample form (costs one gradient copy)",
    )


class HooksGradSampler(MaterializingGradSampler):
    """Layer-by-layer per-sample gradients from the registered layer grad samplers.

    Hooks only see what happens inside the layers that own the parameters. A
    parameter also used elsewhere (``F.linear(x, self.emb.weight)`` in a parent's
    forward, a regulariser added to the loss) would get per-sample gradients that
    miss that use. With ``check_sums`` (default) every flush compares the sum of the
    per-sample gradients with the gradient autograd computed for the parameter in
    the same backward passes, and raises :class:`GradSampleError` on a difference.
    """

    def __init__(self, *, store_grad_sample: bool = False, check_sums: bool = True) -> None:
        super().__init__(store_grad_sample=store_grad_sample)
        self.check_sums = check_sums
        self._autograd_sums: dict[str, Tensor] = {}
        self._sums_known = True
        self._param_handles: list[Any] = []

    def attach(self, module: nn.Module, **kwargs: Any) -> None:
        super().attach(module, **kwargs)
        assert self.capture is not None
        self._names = {id(p): n for n, p in self._params.items()}
        if self.check_sums:
            self._param_handles = [
                p.register_hook(self._param_hook(name)) for name, p in self._params.items()
            ]

    def detach(self) -> None:
        for handle in self._param_handles:
            handle.remove()
        self._param_handles = []
        super().detach()

    def clear(self) -> None:
        super().clear()
        self._autograd_sums = {}
        self._sums_known = True

    def _param_hook(self, name: str) -> Any:
        def hook(grad: Tensor) -> None:
            current = self.capture._current if self.capture is not None else None
            if current is None or current.batch_size == 0:
                self._sums_known = False  # nothing to compare with (e.g. an empty batch)
                return
            scale = current.batch_size if self.loss_reduction == "mean" else 1
            prev = self._autograd_sums.get(name)
            g = grad.detach() * scale
            self._autograd_sums[name] = g if prev is None else prev + g

        return hook

    def per_sample_grads(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        fresh = self._grads is None
        low_precision = (
            fresh
            and self.capture is not None
            and any(
                o.dtype in (torch.float16, torch.bfloat16)
                for batch in self.capture.peek_pending()
                for calls in batch.calls.values()
                for call in calls
                for o in call.outputs
            )
        )
        grads = super().per_sample_grads()
        if fresh and self.check_sums:
            sums, known = self._autograd_sums, self._sums_known
            self._autograd_sums, self._sums_known = {}, True
            if known:
                self._check_sums(grads, sums, low_precision)
        return grads

    def _check_sums(
        self, grads: dict[str, Tensor], sums: dict[str, Tensor], low_precision: bool
    ) -> None:
        # Both sides carry rounding error of the order of the *whole* gradient's precision
        # (bf16 activations, TF32 convolutions/matmuls on GPUs), which is large relative to
        # a parameter whose gradient nearly cancels; a use the hooks missed is not.
        cuda = any(p.is_cuda for p in self._params.values())
        tf32 = cuda and (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
        rtol, gtol = (5e-2, 1e-2) if low_precision else ((1e-2, 1e-3) if tf32 else (1e-3, 1e-4))
        wants = {
            n: sums[n].double() if n in sums else torch.zeros_like(g[0], dtype=torch.float64)
            for n, g in grads.items()
        }
        total = sum(float(w.norm()) ** 2 for w in wants.values()) ** 0.5
        bad = []
        for name, per_sample in grads.items():
            got, want = per_sample.sum(0).double(), wants[name]
            scale = max(float(want.norm()), float(got.norm()))
            diff = float((got - want).norm())
            if diff > rtol * scale + gtol * total + 1e-6:
                bad.append(f"{name} (differs by {diff:.3g} of {scale:.3g})")
        if bad:
            self.clear()
            raise GradSampleError(
                "the per-sample gradients of " + ", ".join(bad) + " do not add up to the "
                "gradient autograd computed: the parameter is used outside the layer that owns it "
                "(e.g. F.linear(x, self.layer.weight) in a parent's forward), or the loss has a "
                "term without a per-sample form (e.g. a weight penalty added to the loss; use the "
                "optimizer's weight_decay instead). Use grad_sample_mode='functorch' for such "
                "models."
            )

    def make_capture(
        self, module: nn.Module, *, batch_first: bool, loss_reduction: LossReduction
    ) -> ActivationCapture:
        registry = get_registry()
        self._samplers = {
            layer: exact_layer_sampler(registry, layer) for _, layer in trainable_layers(module)
        }

        def batch_first_layer(layer: nn.Module) -> bool:
            return bool(getattr(self._samplers.get(layer), "batch_first_only", False))

        return ActivationCapture(
            module,
            batch_first=batch_first,
            loss_reduction=loss_reduction,
            batch_first_layer=batch_first_layer,
        )

    def layer_sampler(self, layer: nn.Module) -> Any | None:
        """The registered sampler of ``layer`` (None: the torch.func fallback)."""
        return self._samplers.get(layer)

    def compute_batch(self, batch: CapturedBatch) -> dict[str, Tensor]:
        assert self.capture is not None
        grads: dict[str, Tensor] = {}
        for layer, calls in batch.calls.items():
            path = self.capture.paths[layer]
            for call in calls:
                call.check_unmodified(path)
            sampler = self._samplers.get(layer)
            for local, g in self._layer_grads(layer, path, sampler, calls):
                name = self._names.get(id(layer._parameters[local]))
                if name is not None:
                    self.accumulate(grads, name, g)
        return self.completed(grads, batch.batch_size)

    def _layer_grads(
        self, layer: nn.Module, path: str, sampler: Any, calls: Sequence[LayerCall]
    ) -> list[tuple[str, Tensor]]:
        out: list[tuple[str, Tensor]] = []
        if sampler is None:
            own = {n: p for n, p in layer.named_parameters(recurse=False) if p.requires_grad}
            for call in calls:
                out.extend(
                    per_sample_grads_of_call(
                        layer, call, own, capture=self.capture, path=path
                    ).items()
                )
            return out
        pairs = [(positional_inputs(layer, c), c.batched_grad_outputs()[0]) for c in calls]
        if len(pairs) > 1 and hasattr(sampler, "merge_calls"):
            pairs = [sampler.merge_calls(pairs)]
        for inputs, grad_output in pairs:
            out.extend(sampler.per_sample_grads(layer, inputs, grad_output).items())
        return out


def hooks_factory(*, store_grad_sample: bool = False, check_sums: bool = True) -> HooksGradSampler:
    """Forward/backward hooks + registered layer grad samplers (torch.func fallback)."""
    return HooksGradSampler(store_grad_sample=store_grad_sample, check_sums=check_sums)


Options = HooksOptions
