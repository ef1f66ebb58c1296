"""Shared machinery of the grad samplers that materialise per-sample gradients."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from dpcore.capture import ActivationCapture, CapturedBatch, LossReduction
from dpcore.layer_sampling import sq_norms_of, weighted_sums


class MaterializingOptions(BaseModel):
    """Options shared by ``hooks``, ``functorch`` and ``ew``."""

    model_config = ConfigDict(extra="forbid")

    store_grad_sample: bool = Field(
        default=False,
        description="also expose each parameter's per-sample gradients as `p.grad_sample` "
        "(costs a copy of the parameters per sample until the next flush)",
    )


class MaterializingGradSampler:
    """Answers the pipeline's questions from per-sample gradients ``{name: [B, ...]}``.

    Subclasses say how to turn one captured batch into per-sample gradients
    (:meth:`compute_batch`) and which layers to capture (:meth:`make_capture`).
    Several completed batches (backward passes not flushed in between) are
    concatenated along the batch dimension: each row is still one sample.
    """

    def __init__(self, *, store_grad_sample: bool = False) -> None:
        self.store_grad_sample = store_grad_sample
        self.module: nn.Module | None = None
        self.capture: ActivationCapture | None = None
        self._params: dict[str, nn.Parameter] = {}
        self._grads: dict[str, Tensor] | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def attach(
        self,
        module: nn.Module,
        *,
        batch_first: bool = True,
        loss_reduction: LossReduction = "mean",
    ) -> None:
        if self.module is not None:
            self.detach()
        self.module = module
        self.batch_first = batch_first
        self.loss_reduction: LossReduction = loss_reduction
        self._params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.capture = self.make_capture(
            module, batch_first=batch_first, loss_reduction=loss_reduction
        )

    def make_capture(
        self, module: nn.Module, *, batch_first: bool, loss_reduction: LossReduction
    ) -> ActivationCapture:
        return ActivationCapture(module, batch_first=batch_first, loss_reduction=loss_reduction)

    def detach(self) -> None:
        self.clear()
        if self.capture is not None:
            self.capture.remove()
        self.capture = None
        self.module = None

    def named_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self._params)

    def has_pending(self) -> bool:
        return self._grads is not None or (self.capture is not None and self.capture.has_pending())

    def clear(self) -> None:
        self._grads = None
        if self.capture is not None:
            self.capture.clear()
        if self.store_grad_sample:
            for p in self._params.values():
                if hasattr(p, "grad_sample"):
                    del p.grad_sample

    # -- the two questions -------------------------------------------------------------
    def per_sample_grads(self) -> dict[str, Tensor]:
        """``{name: Tensor[B, *shape]}`` for the pending batches (kept until cleared)."""
        if self._grads is None:
            assert self.capture is not None, "attach() the grad sampler to a module first"
            batches = self.capture.take_pending()
            per_batch = [self.compute_batch(b) for b in batches]
            self._grads = {
                name: _concat([g[name] for g in per_batch], p) for name, p in self._params.items()
            }
            if self.store_grad_sample:
                for name, p in self._params.items():
                    p.grad_sample = self._grads[name]  # type: ignore[attr-defined]
        return self._grads

    def per_sample_sq_norms(self) -> dict[str, Tensor]:
        return sq_norms_of(self.per_sample_grads())

    def clipped_sums(self, factors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        grads = self.per_sample_grads()
        sums = weighted_sums(grads, factors)
        self._grads = None
        if self.store_grad_sample:  # keep p.grad_sample for the user until clear()
            pass
        return sums

    # -- subclass API ---------------------------------------------------------------------
    def compute_batch(self, batch: CapturedBatch) -> dict[str, Tensor]:
        raise NotImplementedError

    def accumulate(self, grads: dict[str, Tensor], name: str, value: Tensor) -> None:
        """Add one contribution to a parameter's per-sample gradients (no zero-filled copy
        for the first, the usual only one)."""
        grads[name] = value if name not in grads else grads[name] + value

    def completed(self, grads: dict[str, Tensor], batch_size: int) -> dict[str, Tensor]:
        """``grads`` with zeros for the covered parameters that got no contribution."""
        return {
            n: grads[n] if n in grads else p.new_zeros((batch_size, *p.shape))
            for n, p in self._params.items()
        }


def _concat(parts: list[Tensor], param: Tensor) -> Tensor:
    """Rows of several backward passes, without a copy for the usual single one."""
    if not parts:
        return param.new_zeros((0, *param.shape))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
