"""bk and ghost: a language model's head tied to its input embedding (GPT-2's wte = lm_head) gets
exact per-sample norms and clipped sums without materialising V x D per-sample
gradients (the norms' cross term between the two uses is computed directly)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dpcore
from dpcore.verify import check_per_sample_gradients


class TiedLM(nn.Module):
    def __init__(self, padding_idx: int | None, head_bias: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=padding_idx)
        self.pos = nn.Embedding(5, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=head_bias)
        self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1])[None]
        return self.head(torch.tanh(self.mid(self.emb(ids) + self.pos(positions))))


def lm_loss(reduction: str):  # type: ignore[no-untyped-def]
    def loss(logits: Tensor, ids: Tensor) -> Tensor:
        per_token = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none")
        per_sample = per_token.view(ids.shape).mean(1)
        return per_sample.mean() if reduction == "mean" else per_sample.sum()

    return loss


@pytest.mark.parametrize("mode", ["bk", "ghost"])
@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("head_bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_tied_head_is_exact(
    mode: str, padding_idx: int | None, head_bias: bool, reduction: str
) -> None:
    torch.manual_seed(0)
    model = TiedLM(padding_idx, head_bias)
    ids = torch.randint(0, 11, (4, 5))
    ids[0, :2] = 0  # some padding ids (when padding_idx=0)
    report = check_per_sample_gradients(
        model, ids, ids, lm_loss(reduction), grad_sample_mode=mode, loss_reduction=reduction
    )
    assert report.ok, report.summary()


@pytest.mark.parametrize("mode", ["bk", "ghost"])
@pytest.mark.parametrize("head_bias", [False, True])
def test_tied_head_materialises_nothing(mode: str, head_bias: bool) -> None:
    torch.manual_seed(1)
    model = TiedLM(None, head_bias)
    gs = dpcore.get_registry().create("grad_sampler", mode, {})
    gs.attach(model)
    ids = torch.randint(0, 11, (3, 5))
    lm_loss("mean")(model(ids), ids).backward()
    gs.per_sample_sq_norms()
    assert gs._tied and not gs._materialised
    gs.clipped_sums({n: torch.ones(3) for n in gs.named_parameters()})
    gs.detach()
