"""The checker ignores 0-dim outputs (a loss computed inside forward) when it looks for
batch mixing, and still compares every parameter's per-sample gradients."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dpcore.verify import check_per_sample_gradients


class LossInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        out = self.fc(x)
        per_sample = (out - y).pow(2).sum(1)
        return {"out": out, "loss": per_sample.mean()}


def test_loss_inside_forward_is_checked() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    report = check_per_sample_gradients(
        LossInside(), (x, y), torch.zeros(4), lambda out, _: out["loss"], grad_sample_mode="bk"
    )
    assert report.ok, report.summary()
    assert report.parameters == ["fc.weight", "fc.bias"]


def test_a_wrong_inside_loss_is_still_caught() -> None:
    """A batch-wide normalisation inside the loss (not per sample) shows up as gradient
    mismatches, not hidden by ignoring the scalar output."""

    class BatchNormalisedLoss(LossInside):
        def forward(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
            out = self.fc(x)
            sq = (out - y).pow(2).sum(1)
            return {"out": out, "loss": (sq / sq.detach().sum()).sum()}

    torch.manual_seed(1)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    report = check_per_sample_gradients(
        BatchNormalisedLoss(), (x, y), torch.zeros(4), lambda o, _: o["loss"], "bk"
    )
    assert report.mismatches
