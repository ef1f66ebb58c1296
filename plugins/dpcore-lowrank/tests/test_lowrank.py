"""dpcore-lowrank: discovered through its entry point, and right per the public checker."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import dpcore
from dpcore.verify import check_per_sample_gradients


def lowrank():
    from dpcore_lowrank import LowRankGradSampler, LowRankLinear

    return LowRankLinear, LowRankGradSampler


class Adapted(nn.Module):
    """A small sequence model with two low-rank layers (one also trains its base)."""

    def __init__(self) -> None:
        super().__init__()
        layer_cls, _ = lowrank()
        torch.manual_seed(0)
        self.a = layer_cls(6, 8, rank=2, alpha=4)
        self.b = layer_cls(8, 3, rank=3, train_base=True, bias=False)
        with torch.no_grad():  # a trained-looking update (B starts at zero)
            self.a.lora_b.normal_()
            self.b.lora_b.normal_()

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x))).mean(1)


def test_discovered_through_the_entry_point() -> None:
    layer_cls, sampler_cls = lowrank()
    registry = dpcore.get_registry()
    assert isinstance(registry.layer_grad_sampler_for(layer_cls(2, 2)), sampler_cls)
    info = registry.get("layer_grad_sampler", "dpcore_lowrank.layer.LowRankLinear")
    assert info.provider == "dpcore-lowrank" and info.entry_point == "lowrank"


def test_parameters_and_frozen_base() -> None:
    model = Adapted()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["a.bias", "a.lora_a", "a.lora_b", "b.weight", "b.lora_a", "b.lora_b"]


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew", "ghost", "bk"])
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_checker_agrees_with_micro_batches(mode: str, steps: int, reduction: str) -> None:
    if mode not in dpcore.get_registry().names("grad_sampler"):
        pytest.skip(f"grad sampler {mode!r} is not installed")
    x, y = torch.randn(4, steps, 6), torch.randint(0, 3, (4,))
    report = check_per_sample_gradients(
        Adapted(), x, y, nn.CrossEntropyLoss(reduction=reduction), mode, loss_reduction=reduction
    )
    assert report.ok, report.summary()


def test_fast_norms_and_sums_on_both_sides_of_the_ghost_threshold() -> None:
    layer_cls, sampler_cls = lowrank()
    layer = layer_cls(3, 2, rank=2, train_base=True)
    sampler = sampler_cls()
    for steps in (1, 2, 30):  # T=30: instantiation is cheaper; T<=2: ghost
        x, g = torch.randn(3, steps, 3), torch.randn(3, steps, 2)
        grads = sampler.per_sample_grads(layer, (x,), g)
        norms = sampler.per_sample_sq_norms(layer, (x,), g)
        factors = {n: torch.rand(3) for n in grads}
        sums = sampler.clipped_sums(layer, (x,), g, factors)
        for name, per_sample in grads.items():
            torch.testing.assert_close(norms[name], per_sample.flatten(1).pow(2).sum(1))
            torch.testing.assert_close(
                sums[name], torch.einsum("b,b...->...", factors[name], per_sample)
            )


def test_a_wrong_sampler_would_be_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker is a real test: break the sampler and it fails, naming the parameter."""
    _, sampler_cls = lowrank()
    original = sampler_cls.per_sample_grads

    def wrong(self, layer, inputs, grad_output):
        grads = original(self, layer, inputs, grad_output)
        grads["lora_a"] = grads["lora_a"] * 1.01
        return grads

    monkeypatch.setattr(sampler_cls, "per_sample_grads", wrong)
    report = check_per_sample_gradients(
        Adapted(), torch.randn(3, 2, 6), torch.randint(0, 3, (3,)), nn.CrossEntropyLoss(), "hooks"
    )
    assert not report.ok
    assert report.mismatched_parameters == ["a.lora_a", "b.lora_a"]
