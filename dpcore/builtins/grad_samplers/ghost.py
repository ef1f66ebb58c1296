"""``ghost``: ghost clipping with two backward passes and no per-sample gradients.

The user's loop is unchanged (``loss.backward(); optimizer.step()``): a forward
hook of the root module hands the user a detached copy of the model's output,
so the user's ``loss.backward()`` only computes ``∂loss/∂output``. At clipping
time the sampler runs the model's backward itself, twice:

1. each layer's per-sample norms are computed as its output gradient arrives
   (ghost norm, outer-product identity, embedding scatter form or instantiation,
   by the layer's grad sampler) and the gradient is dropped at once;
2. once the clip factors are known, the second pass computes each layer's
   clipped sum ``aᵀ diag(c) g`` as its output gradient arrives.

Neither pass forms the unclipped weight gradients, and output gradients are
never kept beyond their layer, so the memory is that of non-private training.
A model that computes its loss inside ``forward`` (no batch dimension on its
output) cannot be served: use ``bk`` there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from dpcore.bookkeeping import BookkeepingSampler, Call, LossReduction, Unit
from dpcore.errors import GradSampleError
from dpcore.hookspecs import Register

Phase = Literal["norms", "sums"]


class GhostGradSampler(BookkeepingSampler):
    """Ghost clipping: per-sample norms, then a second backward for the clipped sums."""

    def __init__(self) -> None:
        super().__init__()
        self._roots: list[tuple[Tensor, Tensor]] = []  # (output with graph, detached copy)
        self._roots_batch: int | None = None
        self._phase: Phase | None = None
        self._factors: Mapping[str, Tensor] = {}
        self._acc: dict[str, Tensor] = {}
        self._norms: dict[str, Tensor] | None = None
        self._forward_calls: dict[int, int] = {}
        self._materialising: set[int] = set()

    def attach(
        self, module: nn.Module, *, batch_first: bool = True, loss_reduction: LossReduction = "mean"
    ) -> None:
        super().attach(module, batch_first=batch_first, loss_reduction=loss_reduction)
        self._handles.append(module.register_forward_hook(self._root_forward_hook))
        for unit in self.units:
            self._handles.append(unit.layer.register_forward_pre_hook(self._count_call))

    # -- forward -----------------------------------------------------------------------------
    def _count_call(self, layer: nn.Module, args: Any) -> None:
        if self._recording():
            self._forward_calls[id(layer)] = self._forward_calls.get(id(layer), 0) + 1

    def _root_forward_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not self._recording():
            return None
        leaves, spec = pytree.tree_flatten(output)
        dim = 0 if self.batch_first else 1
        new = []
        for leaf in leaves:
            if isinstance(leaf, Tensor) and leaf.requires_grad:
                if leaf.dim() <= dim or leaf.shape[dim] != self._root_batch:
                    raise GradSampleError(
                        f"grad_sample_mode='ghost' needs every output of the model to have the "
                        f"batch dimension {dim} (size {self._root_batch}), but one has shape "
                        f"{tuple(leaf.shape)}: the model seems to compute its loss inside "
                        "forward. Use grad_sample_mode='bk' (one backward pass, same speed), "
                        "or return per-sample outputs and compute the loss outside the model."
                    )
                detached = leaf.detach().requires_grad_()
                self._roots.append((leaf, detached))
                self._roots_batch = self._root_batch
                leaf = detached
            new.append(leaf)
        return pytree.tree_unflatten(new, spec)

    # -- backward passes -----------------------------------------------------------------------
    def has_pending(self) -> bool:
        return any(d.grad is not None for _, d in self._roots)

    def _simple(self, unit: Unit) -> bool:
        return not unit.shared and self._forward_calls.get(id(unit.layer), 0) <= 1

    def _consume(self, unit: Unit, call: Call) -> None:
        if self._phase == "sums" and id(unit.layer) in self._materialising:
            return  # its per-sample gradients were kept in the first pass
        if not self._simple(unit):
            unit.calls.append(call)
            return
        unit.calls = [call]
        if self._phase == "norms":
            self._acc.update(self._unit_sq_norms(unit))
        else:
            self._acc.update(self._unit_clipped_sums(unit, self._factors))
        unit.calls = []  # drop the output gradient now

    @contextlib.contextmanager
    def _keep_param_grads(self) -> Iterator[None]:
        """Layers recorded by hooks let autograd form their parameter gradients;
        those are not ours to leave in ``p.grad``."""
        params = [p for u in self.units if not u.tapped for p in u.layer.parameters(recurse=False)]
        saved = [p.grad for p in params]
        try:
            yield
        finally:
            for p, g in zip(params, saved, strict=True):
                p.grad = g

    def _run_pass(self, phase: Phase) -> None:
        roots = [(t, d.grad) for t, d in self._roots if d.grad is not None]
        if not roots:
            return
        self._phase = phase
        # the next batch's forward may already have started (the optimizer flushes from
        # a forward pre-hook): check output gradients against this batch's size
        self._batch_size = self._roots_batch
        try:
            with self._keep_param_grads():
                torch.autograd.backward(
                    [t for t, _ in roots], [g for _, g in roots], retain_graph=phase == "norms"
                )
        finally:
            self._phase = None

    def per_sample_sq_norms(self) -> dict[str, Tensor]:
        if self._norms is None:
            self._acc, self._materialised = {}, {}
            self._run_pass("norms")
            self._check_outside_uses()
            norms = self._acc
            # tied embedding + head (GPT-2): a cross term instead of V x D per-sample grads
            self._tied = []
            for emb, lin in self._tied_pairs():
                tied = self._tied_sq_norms(emb, lin)
                if tied is not None:
                    norms.update(tied)
                    self._tied.append((emb, lin))
                    emb.calls, lin.calls = [], []  # recorded again by the second pass
            for unit in self.units:
                if unit.calls:
                    if unit.shared or (
                        len(unit.calls) > 1 and not hasattr(unit.sampler, "merge_calls")
                    ):
                        self._materialising.add(id(unit.layer))
                    norms.update(self._unit_sq_norms(unit))
                    unit.calls = []
            norms.update(self._materialised_sq_norms())
            self._norms = self._complete(norms)
        return self._norms

    def clipped_sums(self, factors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self._norms is None:
            self.per_sample_sq_norms()
        self._acc, self._factors = {}, factors
        self._run_pass("sums")
        return self._recorded_clipped_sums(factors, self._acc)

    def clear(self) -> None:
        super().clear()
        self._roots = []
        self._roots_batch = None
        self._norms = None
        self._acc = {}
        self._factors = {}
        self._forward_calls = {}
        self._materialising = set()
        self._tied = []


def register_grad_samplers(register: Register) -> None:
    register(
        "ghost",
        GhostGradSampler,
        description="ghost clipping: norms, then a second backward for clipped sums",
    )
