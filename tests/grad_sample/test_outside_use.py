"""A parameter of a tapped layer used outside that layer (``F.linear(x, layer.weight)`` in
a parent, a weight penalty in the loss) gets a gradient from autograd that ``bk``/``ghost``
per-sample gradients do not contain: both refuse it, naming the parameter, instead of
privatising a gradient that disagrees with the per-sample oracle. ``hooks`` catches the
same models with its sum check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from grad_sample._ref import microbatch_grads
from torch import Tensor, nn

import dpcore
from dpcore.errors import GradSampleError
from dpcore.optimizer import DPOptimizer

FAST = ["bk", "ghost"]


class LinearUsedTwice(nn.Module):
    """``lin`` runs as a module and its weight is read again by ``F.linear`` in the parent
    (when ``outside`` is set)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)
        self.outside = True

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        if self.outside:
            h = F.linear(h, self.lin.weight)
        return self.head(h)


def mse(out: Tensor, y: Tensor) -> Tensor:
    return (out - y).pow(2).sum(1).mean()


def attached(mode: str, model: nn.Module) -> object:
    gs = dpcore.get_registry().create("grad_sampler", mode)
    gs.attach(model)
    return gs


@pytest.mark.parametrize("mode", FAST)
def test_functional_use_of_a_tapped_weight_is_refused(mode: str) -> None:
    torch.manual_seed(0)
    model = LinearUsedTwice()
    gs = attached(mode, model)
    mse(model(torch.randn(4, 3)), torch.randn(4, 2)).backward()
    with pytest.raises(GradSampleError, match=r"'lin\.weight'.*outside the layer.*'hooks'"):
        gs.per_sample_sq_norms()
    gs.detach()


@pytest.mark.parametrize("mode", FAST)
def test_weight_penalty_in_the_loss_is_refused(mode: str) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    gs = attached(mode, model)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    loss = mse(model(x), y) + 1e-2 * model[2].weight.pow(2).sum()
    loss.backward()
    with pytest.raises(GradSampleError, match=r"'2\.weight'") as info:
        gs.per_sample_sq_norms()
    assert "'0.weight'" not in str(info.value)  # only the penalised parameter is named
    assert "weight_decay" in str(info.value)
    gs.detach()


@pytest.mark.parametrize("mode", FAST)
def test_the_same_model_without_the_outside_use_matches_micro_batches(mode: str) -> None:
    """The watch has no false positive: no outside use, per-sample norms as the oracle."""
    torch.manual_seed(2)
    model = LinearUsedTwice()
    model.outside = False
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    want = microbatch_grads(model, x, y, mse)
    gs = attached(mode, model)
    mse(model(x), y).backward()
    norms = gs.per_sample_sq_norms()
    for name, g in want.items():
        torch.testing.assert_close(norms[name], g.flatten(1).pow(2).sum(1))
    gs.detach()


def test_a_weight_shared_with_a_hooked_layer_is_not_an_outside_use() -> None:
    """A custom layer owning the tapped Linear's weight is recorded by hooks: autograd
    forms that weight's gradient legitimately, and ``bk`` sums both uses per sample."""

    class Scaled(nn.Module):  # not tapped: recorded by hooks, torch.func fallback
        def __init__(self, weight: nn.Parameter) -> None:
            super().__init__()
            self.weight = weight

        def forward(self, x: Tensor) -> Tensor:
            return 2.0 * F.linear(x, self.weight)

    torch.manual_seed(3)
    lin = nn.Linear(3, 3, bias=False)
    model = nn.Sequential(lin, nn.Tanh(), Scaled(lin.weight), nn.Linear(3, 2))
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    want = microbatch_grads(model, x, y, mse)
    for mode in FAST:
        gs = attached(mode, model)
        mse(model(x), y).backward()
        norms = gs.per_sample_sq_norms()
        for name, g in want.items():
            torch.testing.assert_close(norms[name], g.flatten(1).pow(2).sum(1), msg=name)
        gs.clear()
        gs.detach()
        for p in model.parameters():
            p.grad = None


@pytest.mark.parametrize("mode", FAST)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_refused_in_a_later_step_whatever_zero_grad_does(mode: str, set_to_none: bool) -> None:
    """Steps without the outside use pass (p.grad holds the optimizer's private gradient,
    or zeros after ``zero_grad(set_to_none=False)``); the first step with it is refused."""
    torch.manual_seed(4)
    model = LinearUsedTwice()
    model.outside = False
    gs = attached(mode, model)
    clipper = dpcore.get_registry().create(
        "clipper", "flat", {}, max_grad_norm=1.0, parameter_names=list(gs.named_parameters())
    )
    opt = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        grad_sampler=gs,
        clipper=clipper,
        noise=dpcore.get_registry().create("noise", "gaussian"),
        noise_multiplier=0.0,
        expected_batch_size=4,
        module=model,
    )
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    for _ in range(2):
        opt.zero_grad(set_to_none=set_to_none)
        mse(model(x), y).backward()
        opt.step()
    model.outside = True
    opt.zero_grad(set_to_none=set_to_none)
    mse(model(x), y).backward()
    with pytest.raises(GradSampleError, match=r"'lin\.weight'"):
        opt.step()
    gs.detach()


def test_hooks_still_catches_both() -> None:
    torch.manual_seed(5)
    model = LinearUsedTwice()
    gs = attached("hooks", model)
    mse(model(torch.randn(4, 3)), torch.randn(4, 2)).backward()
    with pytest.raises(GradSampleError, match=r"lin\.weight.*outside the layer"):
        gs.per_sample_sq_norms()
    gs.detach()

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    gs = attached("hooks", model)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    (mse(model(x), y) + 1e-2 * model[2].weight.pow(2).sum()).backward()
    with pytest.raises(GradSampleError, match=r"2\.weight.*weight_decay"):
        gs.per_sample_sq_norms()
    gs.detach()
