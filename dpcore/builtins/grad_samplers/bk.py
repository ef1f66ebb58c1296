"""``bk``: book-keeping fast clipping in one backward pass.

The user's loop is unchanged (``loss.backward(); optimizer.step()``). During the
backward pass each tapped layer returns only its input gradient and keeps its
activation ``a`` and output gradient ``g``; autograd never forms the unclipped
weight gradients. At clipping time each layer's layer grad sampler computes the
per-sample norms (ghost norm or instantiation, whichever is cheaper for that
call) and then the clipped sum ``aᵀ diag(c) g`` directly.

Memory: the output gradients of the trainable layers are kept until the
optimizer flushes the batch (at ``step()`` or at the next forward), on top of the
activations autograd keeps anyway. Use ``ghost`` when that does not fit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from dpcore.bookkeeping import BookkeepingSampler, Call, Unit, _trainable
from dpcore.hookspecs import Register


class BookKeepingGradSampler(BookkeepingSampler):
    """Book-keeping: one backward pass, per-sample norms and clipped sums per layer."""

    #: the flush is a fixed sequence of kernels for fixed shapes (see dpcore.graphs)
    graph_safe = True

    def __init__(self) -> None:
        super().__init__()
        self._norms: dict[str, Tensor] | None = None
        self._eager: dict[int, bool] = {}  # per unit, decided at its first call of a batch

    def has_pending(self) -> bool:
        if self._batch_size == 0:
            return True  # an empty batch is pending until clipped (zero sums)
        return bool(self._materialised) or any(unit.calls for unit in self.units)

    def _consume(self, unit: Unit, call: Call) -> None:
        """Small layers (norms, biases, early convolutions) are cheaper to keep as
        per-sample gradients than as activations and output gradients: instantiate them
        as soon as the output gradient arrives and let the tensors go."""
        if call.grad_output.shape[0] == 0:
            # [distributed owner] an empty (e.g. a rank's empty Poisson draw) batch
            # contributes nothing; it must not decide "eager" either (0 <= 0)
            return
        eager = self._eager.get(id(unit))
        if eager is None:
            kept = sum(t.numel() * t.element_size() for t in (*call.inputs, call.grad_output))
            own = unit.own_numel
            # layers with a fused kernel are cheaper at the step unless their per-sample
            # gradients are far smaller than what they would keep
            ratio = 8 if unit.kernel is not None else 1
            eager = 4 * own * call.grad_output.shape[0] * ratio <= kept
            self._eager[id(unit)] = eager
        if not eager:
            unit.calls.append(call)
            return
        if getattr(unit.kernel, "per_sample_grads", None) is not None:
            want = {n for n in unit.names if _trainable(unit.layer, n)}
            grads = unit.kernel.per_sample_grads(unit.layer, call.inputs[0], call.grad_output, want)
        else:
            with self.paused():
                grads = unit.sampler.per_sample_grads(unit.layer, call.inputs, call.grad_output)
        for q, g in unit.qualify(grads).items():
            prev = self._materialised.get(q)
            self._materialised[q] = g if prev is None else prev + g

    def per_sample_sq_norms(self) -> dict[str, Tensor]:
        if self._norms is None:
            self._check_outside_uses()
            norms: dict[str, Tensor] = {}
            # tied embedding + head: norms with a cross term, no per-sample V x D gradients
            self._tied = []
            for emb, lin in self._tied_pairs():
                tied = self._tied_sq_norms(emb, lin)
                if tied is not None:
                    norms.update(tied)
                    self._tied.append((emb, lin))
            tied_units = {id(u) for pair in self._tied for u in pair}
            # unscaled here, then multiplied by the mean-reduction scale² in one launch
            unscaled: dict[str, Tensor] = {}
            for unit in self.units:
                if unit.calls and id(unit) not in tied_units:
                    unscaled.update(self._unit_sq_norms(unit, scaled=False))
            unscaled.update(self._materialised_sq_norms(scaled=False))
            s2 = self._scale**2
            if s2 != 1.0 and unscaled:
                unscaled = dict(
                    zip(unscaled, torch._foreach_mul(list(unscaled.values()), s2), strict=True)
                )
            norms.update(unscaled)
            self._norms = self._complete(norms)
        return self._norms

    def clipped_sums(self, factors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self._norms is None:  # the materialised contributions are formed there
            self.per_sample_sq_norms()
        return self._recorded_clipped_sums(factors)

    # -- CUDA-graph replay (dpcore.graphs) ------------------------------------------------
    def graph_inputs(self) -> tuple[list[Tensor], int, Callable[[], None]] | None:
        """The recorded tensors the flush reads, the batch size and a function that puts
        the pending batch back as it is now (after a discarded capture: tensors made in
        it hold garbage, none may survive); None when the batch cannot be replayed."""
        batch = self._batch_size
        if self._norms is not None or not batch:
            return None
        self._check_outside_uses()
        tensors = [t for unit in self.units for c in unit.calls for t in (*c.inputs, c.grad_output)]
        tensors += self._materialised.values()
        calls = [list(unit.calls) for unit in self.units]
        materialised, eager = dict(self._materialised), dict(self._eager)

        def restore() -> None:
            self.clear()
            for unit, unit_calls in zip(self.units, calls, strict=True):
                unit.calls = list(unit_calls)
            self._materialised, self._batch_size, self._eager = dict(materialised), batch, eager

        return tensors, batch, restore

    def clear(self) -> None:
        super().clear()
        self._norms = None
        self._eager = {}
        self._tied = []


def register_grad_samplers(register: Register) -> None:
    register(
        "bk",
        BookKeepingGradSampler,
        description="book-keeping fast clipping: one backward pass, no per-sample gradients",
    )
