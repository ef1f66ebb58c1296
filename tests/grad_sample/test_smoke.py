"""First checks of hooks/functorch/ew against micro-batches on a small mixed model."""

from __future__ import annotations

import pytest
import torch
from grad_sample._ref import microbatch_grads, sampler_grads
from torch import nn


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 6, 3, padding="same", groups=2)
        self.ln = nn.LayerNorm(6)
        self.lin = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        return self.lin(self.ln(h)).mean(1)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew"])
def test_mixed_model_matches_microbatches(mode: str) -> None:
    torch.manual_seed(0)
    model = Mixed()
    x, y = torch.randint(0, 20, (5, 7)), torch.randint(0, 3, (5,))
    loss_fn = nn.CrossEntropyLoss()
    ref = microbatch_grads(model, x, y, loss_fn)
    grads, norms, gs = sampler_grads(mode, model, x, y, loss_fn)
    for name, expected in ref.items():
        torch.testing.assert_close(grads[name], expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            norms[name], expected.flatten(1).pow(2).sum(1), atol=1e-5, rtol=1e-4
        )
    gs.detach()
