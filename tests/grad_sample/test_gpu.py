"""The same checks on a CUDA device (skipped without one): every layer family and grad
sampler against micro-batches, and float32 norms under bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import dpcore
from dpcore.layers import DPLSTM, DPMultiheadAttention
from dpcore.verify import check_per_sample_gradients

pytestmark = pytest.mark.gpu
MODES = dpcore.get_registry().names("grad_sampler")


class Everything(nn.Module):
    """One of each family on one batch: ids [B, T] -> logits [B, 3]."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(20, 8, padding_idx=0)
        self.pos = nn.Embedding(16, 8)
        self.norm = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8)
        self.attention = DPMultiheadAttention(8, 2, batch_first=True)
        self.lstm = DPLSTM(8, 8, batch_first=True)
        self.conv = nn.Conv1d(8, 8, 3, padding="same", groups=2)
        self.group = nn.GroupNorm(2, 8)
        self.instance = nn.InstanceNorm1d(8, affine=True)
        self.conv2 = nn.Conv2d(1, 2, 3, padding=1)
        self.bag = nn.EmbeddingBag(20, 8, mode="mean")
        self.head = nn.Linear(8 + 2, 3)

    def forward(self, ids: Tensor) -> Tensor:
        batch, steps = ids.shape
        positions = torch.arange(steps, device=ids.device).expand(batch, steps)
        h = self.norm(self.tok(ids) + self.pos(positions))
        h = h + self.attention(h, h, h, need_weights=False)[0]
        h = self.rms(self.lstm(h)[0])
        c = self.instance(self.group(self.conv(h.transpose(1, 2))))
        image = self.conv2(c[:, None]).mean(dim=(2, 3))
        pooled = c.mean(2) + self.bag(ids)
        return self.head(torch.cat([pooled, image], dim=1))


def cuda_case() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = Everything().cuda()
    ids = torch.randint(0, 20, (4, 6), device="cuda")
    return model, ids, torch.randint(0, 3, (4,), device="cuda")


@pytest.mark.parametrize("mode", MODES)
def test_everything_on_cuda(mode: str) -> None:
    model, ids, y = cuda_case()
    report = check_per_sample_gradients(
        model, ids, y, nn.CrossEntropyLoss(), mode, atol=1e-4, rtol=1e-3
    )
    if mode == "ew":  # refuses RMSNorm / padded embeddings / EmbeddingBag, with a clear error
        assert report.ok or report.error is not None, report.summary()
        return
    assert report.ok, report.summary()


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_bf16_autocast_norms_in_float32(mode: str) -> None:
    model, ids, y = cuda_case()
    gs = dpcore.get_registry().create("grad_sampler", mode)
    gs.attach(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(ids).float(), y)
    loss.backward()
    norms = gs.per_sample_sq_norms()
    assert all(n.dtype == torch.float32 and n.device.type == "cuda" for n in norms.values())
    assert all(bool(torch.isfinite(n).all()) for n in norms.values())
    sums = gs.clipped_sums({k: torch.ones(4, device="cuda") for k in norms})
    for name, p in gs.named_parameters().items():
        assert sums[name].dtype == p.dtype and sums[name].device == p.device
    gs.detach()
