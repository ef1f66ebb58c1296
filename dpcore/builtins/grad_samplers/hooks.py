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

from torch import Tensor, nn

from dpcore.capture import (
    ActivationCapture,
    CapturedBatch,
    LayerCall,
    LossReduction,
    trainable_layers,
)
from dpcore.registry import get_registry

from ._base import MaterializingGradSampler, MaterializingOptions
from .functorch import per_sample_grads_of_call


@lru_cache(maxsize=256)
def _signature(layer_type: type) -> inspect.Signature | None:
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
    sig = _signature(type(layer))
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


class HooksGradSampler(MaterializingGradSampler):
    """Layer-by-layer per-sample gradients from the registered layer grad samplers."""

    def attach(self, module: nn.Module, **kwargs: Any) -> None:
        super().attach(module, **kwargs)
        assert self.capture is not None
        self._names = {id(p): n for n, p in self._params.items()}

    def make_capture(
        self, module: nn.Module, *, batch_first: bool, loss_reduction: LossReduction
    ) -> ActivationCapture:
        registry = get_registry()
        self._samplers = {
            layer: registry.layer_grad_sampler_for(layer) for _, layer in trainable_layers(module)
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
        grads = self.zeros_for(batch.batch_size)
        for layer, calls in batch.calls.items():
            path = self.capture.paths[layer]
            for call in calls:
                call.check_unmodified(path)
            sampler = self._samplers.get(layer)
            for local, g in self._layer_grads(layer, path, sampler, calls):
                name = self._names.get(id(layer._parameters[local]))
                if name is not None:
                    grads[name] += g
        return grads

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


def hooks_factory(*, store_grad_sample: bool = False) -> HooksGradSampler:
    """Forward/backward hooks + registered layer grad samplers (torch.func fallback)."""
    return HooksGradSampler(store_grad_sample=store_grad_sample)


Options = MaterializingOptions
