"""Reference per-sample gradients: micro-batches of size one, plain autograd."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

import dpcore


def microbatch_grads(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    batch_first: bool = True,
) -> dict[str, Tensor]:
    """``{name: [B, *shape]}``: gradient of each sample's loss computed alone."""
    model = copy.deepcopy(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    dim = 0 if batch_first else 1
    batch = x.shape[dim]
    rows: dict[str, list[Tensor]] = {n: [] for n in params}
    for i in range(batch):
        xi = x.narrow(dim, i, 1)
        yi = y.narrow(0, i, 1)  # targets are per sample: [B, ...]
        grads = torch.autograd.grad(
            loss_fn(model(xi), yi), list(params.values()), allow_unused=True
        )
        for (n, p), g in zip(params.items(), grads, strict=True):
            rows[n].append(torch.zeros_like(p) if g is None else g)
    return {
        n: torch.stack(r) if r else p.new_zeros((0, *p.shape))
        for (n, p), r in zip(params.items(), rows.values(), strict=True)
    }


def sampler_grads(
    mode: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    batch_first: bool = True,
    loss_reduction: str = "mean",
) -> tuple[dict[str, Tensor], dict[str, Tensor], object]:
    """(per-sample grads via grad_sample, sq norms) from grad sampler ``mode``."""
    gs = dpcore.get_registry().create("grad_sampler", mode, {"store_grad_sample": True})
    gs.attach(model, batch_first=batch_first, loss_reduction=loss_reduction)
    try:
        loss_fn(model(x), y).backward()
        norms = gs.per_sample_sq_norms()
        grads = {n: p.grad_sample.clone() for n, p in gs.named_parameters().items()}
    except BaseException:
        gs.detach()
        raise
    return grads, norms, gs
