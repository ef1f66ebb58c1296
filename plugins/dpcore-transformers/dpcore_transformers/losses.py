"""Per-sample token losses for language models.

DP-SGD clips each *sample's* gradient, so a sample's loss must depend on that
sample alone. Hugging Face's causal-LM loss averages over all non-padding tokens
of the *batch*: a sample's weight then depends on how many tokens the other
samples have, and adding or removing one sample changes the contribution of every
other one — the sensitivity argument of DP-SGD no longer holds. Here a sample's
loss is the mean over its own predicted tokens (labels ``!= ignore_index``), and
the batch loss is the mean (or sum) of those per-sample losses.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn


def per_token_losses(
    logits: Tensor, labels: Tensor, *, ignore_index: int = -100, shift: bool = True
) -> tuple[Tensor, Tensor]:
    """``(losses [B, T'], mask [B, T'])`` of next-token prediction (float32)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    labels = labels.to(logits.device)
    losses = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    ).view(labels.shape)
    return losses, labels != ignore_index


def causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    shift: bool = True,
) -> Tensor:
    """Each sample's mean loss over its own predicted tokens, then ``reduction`` over
    the batch (``"mean"`` or ``"sum"``; use the engine's ``loss_reduction``). A sample
    with no predicted token contributes zero."""
    losses, mask = per_token_losses(logits, labels, ignore_index=ignore_index, shift=shift)
    per_sample = (losses * mask).sum(1) / mask.sum(1).clamp(min=1)
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


class CausalLMLoss(nn.Module):
    """:func:`causal_lm_loss` as a loss module ``loss(logits, labels)`` (for ``dpcore train``)."""

    def __init__(self, reduction: str = "mean", ignore_index: int = -100) -> None:
        super().__init__()
        self.reduction, self.ignore_index = reduction, ignore_index

    def forward(self, logits: Any, labels: Tensor) -> Tensor:
        logits = getattr(logits, "logits", logits)
        return causal_lm_loss(
            logits, labels, ignore_index=self.ignore_index, reduction=self.reduction
        )


def use_per_sample_loss(model: nn.Module, reduction: str = "mean") -> nn.Module:
    """Make ``model(..., labels=...)`` compute :func:`causal_lm_loss` (per-sample token
    means) instead of Hugging Face's batch-wide token mean. Returns the model.

    Only causal language models are changed; sequence-classification losses are
    already means of per-sample losses.
    """
    target: Any = model  # a PEFT wrapper's base_model chain leads to the transformers model
    while not hasattr(type(target), "loss_function") and hasattr(target, "base_model"):
        inner = target.base_model
        if inner is target:
            break
        target = inner
    current = getattr(target, "loss_function", None)
    if getattr(current, "__name__", "") != "ForCausalLMLoss":
        return model  # not a causal LM loss (or already replaced)

    def loss_function(
        logits: Tensor,
        labels: Tensor,
        vocab_size: int | None = None,
        ignore_index: int = -100,
        shift_labels: Tensor | None = None,
        **_: Any,
    ) -> Tensor:
        if shift_labels is not None:
            return causal_lm_loss(
                logits, shift_labels, ignore_index=ignore_index, reduction=reduction, shift=False
            )
        return causal_lm_loss(logits, labels, ignore_index=ignore_index, reduction=reduction)

    loss_function._dpcore_per_sample = True  # type: ignore[attr-defined]
    for sub in model.modules():  # the PEFT wrapper and the transformers model inside
        if hasattr(type(sub), "loss_function") and isinstance(sub, nn.Module):
            try:
                sub.loss_function = loss_function  # type: ignore[assignment]
            except AttributeError:
                pass
    return model


def has_per_sample_lm_loss(model: nn.Module) -> bool:
    """Whether :func:`use_per_sample_loss` changed ``model``'s causal-LM loss."""
    return any(
        getattr(sub.__dict__.get("_loss_function"), "_dpcore_per_sample", False)
        for sub in model.modules()
    )


__all__ = [
    "CausalLMLoss",
    "causal_lm_loss",
    "has_per_sample_lm_loss",
    "per_token_losses",
    "use_per_sample_loss",
]
