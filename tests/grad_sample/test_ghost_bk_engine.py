"""``bk`` and ``ghost`` inside the engine: every clipper, gradient accumulation over
several backward passes, and the same update as the materialising ``hooks`` sampler."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import dpcore


class SeqModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, 8)
        self.norm = nn.LayerNorm(8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 13)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.norm(self.emb(ids))
        h = h + torch.tanh(self.conv(h.transpose(1, 2))).transpose(1, 2)
        return self.fc(h)


def train(
    mode: str,
    clipping: str,
    model: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    accumulate: int,
) -> nn.Module:
    data = TensorDataset(torch.zeros(40, 1))
    engine = dpcore.PrivacyEngine(accountant="rdp")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model, opt, _ = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=DataLoader(data, batch_size=8),
        noise_multiplier=0.0,
        max_grad_norm=0.05,
        grad_sample_mode=mode,
        clipping=clipping,
        wrap_model=False,
        seed=0,
        poisson_sampling=False,
    )
    for i, (x, y) in enumerate(batches):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()
    return model


@pytest.mark.parametrize("clipping", ["flat", "per_layer", "automatic", "adaptive"])
@pytest.mark.parametrize("mode", ["bk", "ghost"])
def test_same_update_as_hooks(mode: str, clipping: str) -> None:
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randint(13, (b, 6), generator=g), torch.randint(13, (b, 6), generator=g))
        for b in (5, 3, 4, 6)
    ]
    torch.manual_seed(0)
    model = SeqModel()
    want = train("hooks", clipping, copy.deepcopy(model), batches, accumulate=2)
    got = train(mode, clipping, copy.deepcopy(model), batches, accumulate=2)
    moved = False
    for (name, p), q, p0 in zip(
        got.named_parameters(), want.parameters(), model.parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
        moved |= not torch.equal(p, p0)
    assert moved
