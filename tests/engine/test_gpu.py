"""The engine on a CUDA device: every grad sampler and clipper, secure noise, physical
batches. Skipped without a GPU; also runs as a script (``python tests/engine/test_gpu.py``)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpcore

pytestmark = pytest.mark.gpu
MODES = ["hooks", "functorch", "ghost", "bk"]
CLIPPERS = ["flat", "per_layer", "adaptive", "automatic"]


def _data(n=96):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)
    )


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 4)
    ).cuda()


def _batches_to(dl):
    for x, y in dl:
        yield x.cuda(), y.cuda()


@pytest.mark.parametrize(
    "mode,clipping,secure", list(itertools.product(MODES, CLIPPERS, [False, True]))
)
def test_training_steps_on_cuda(mode, clipping, secure):
    model = _model()
    engine = dpcore.PrivacyEngine(accountant="rdp", secure_mode=secure)
    model, opt, dl = engine.make_private(
        module=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        data_loader=DataLoader(_data(), batch_size=24),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
        clipping=clipping,
        seed=None if secure else 0,
    )
    if not secure:
        assert engine.noise_generator.device.type == "cuda"
    with dpcore.BatchMemoryManager(data_loader=dl, max_physical_batch_size=8, optimizer=opt) as pl:
        for x, y in _batches_to(pl):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert engine.steps == 4
    for p in model.parameters():
        assert p.grad.device.type == "cuda" and torch.isfinite(p).all()
    assert engine.get_epsilon(1e-5) > 0


@pytest.mark.parametrize("mode", MODES)
def test_noiseless_unclipped_step_equals_non_private_step_on_cuda(mode):
    reference = _model()
    private = copy.deepcopy(reference)
    engine = dpcore.PrivacyEngine(accountant="rdp")
    model, opt, dl = engine.make_private(
        module=private,
        optimizer=torch.optim.SGD(private.parameters(), lr=0.1),
        data_loader=DataLoader(_data(32), batch_size=32),
        noise_multiplier=0.0,
        max_grad_norm=1e9,
        grad_sample_mode=mode,
        seed=0,
    )
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    ((x, y),) = list(_batches_to(dl))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    nn.functional.cross_entropy(reference(x), y).backward()
    ref_opt.step()
    for a, b in zip(private.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
