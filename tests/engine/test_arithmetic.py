"""The DP optimizer's arithmetic against a hand-computed step, with a test double for the
grad sampler (known per-sample gradients), so every number is known in advance."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dpcore
from dpcore import rng
from dpcore.layer_sampling import sq_norms_of, weighted_sums
from dpcore.registry import get_registry


class KnownGradSampler:
    """Pending batches are given by the test as ``{name: Tensor[B, *shape]}``."""

    def __init__(self, module: nn.Module):
        self.params = dict(module.named_parameters())
        self.pending: list[dict[str, torch.Tensor]] = []

    def named_parameters(self):
        return dict(self.params)

    def has_pending(self):
        return bool(self.pending)

    def per_sample_sq_norms(self):
        return sq_norms_of(self.pending[0])

    def clipped_sums(self, factors):
        return weighted_sums(self.pending.pop(0), factors)

    def clear(self):
        self.pending.clear()


@pytest.mark.parametrize("clipping", ["flat", "per_layer", "adaptive", "automatic"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_step_by_hand(clipping, reduction):
    registry = get_registry()
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    gs = KnownGradSampler(model)
    clipper = registry.create(
        "clipper", clipping, max_grad_norm=0.8, parameter_names=list(gs.params)
    )
    sigma, expected_batch, lr = 1.7, 6.0, 0.3
    opt = dpcore.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr),
        grad_sampler=gs,
        clipper=clipper,
        noise=registry.create("noise", "gaussian"),
        noise_multiplier=sigma,
        expected_batch_size=expected_batch,
        loss_reduction=reduction,
        noise_generator=torch.Generator().manual_seed(42),
    )
    batches = [
        {"weight": torch.randn(4, 2, 3) * 3, "bias": torch.randn(4, 2)},
        {"weight": torch.randn(3, 2, 3) * 0.01, "bias": torch.randn(3, 2) * 0.01},
    ]
    # what the pipeline must compute
    ref_clipper = registry.create(
        "clipper", clipping, max_grad_norm=0.8, parameter_names=list(gs.params)
    )
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for batch in batches:
        factors = ref_clipper.clip_factors(sq_norms_of(batch))
        for n, s in weighted_sums(batch, factors).items():
            expected[n] += s
    std = ref_clipper.gradient_noise_multiplier(sigma) * ref_clipper.sensitivity()
    if clipping == "adaptive":
        assert std > sigma * 0.8
    else:
        assert std == pytest.approx(sigma * 0.8)
    gen = torch.Generator().manual_seed(42)
    for n in expected:  # one draw per parameter, in named_parameters() order
        expected[n] += std * rng.standard_normal(expected[n].shape, generator=gen)
    scale = 1 / expected_batch if reduction == "mean" else 1.0

    for batch in batches:  # two backward passes, one step
        gs.pending.append(batch)
        opt.flush()
    opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n] * scale, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            p.detach(), start[n] - lr * expected[n] * scale, rtol=1e-5, atol=1e-6
        )
    assert opt.steps == 1 and opt.backward_passes == 0


def test_skipped_steps_keep_the_sum_and_do_not_step():
    registry = get_registry()
    model = nn.Linear(2, 1, bias=False)
    before = model.weight.detach().clone()
    gs = KnownGradSampler(model)
    steps = []
    opt = dpcore.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        grad_sampler=gs,
        clipper=registry.create("clipper", "flat", max_grad_norm=100.0, parameter_names=["weight"]),
        noise=registry.create("noise", "gaussian"),
        noise_multiplier=0.0,
        expected_batch_size=2.0,
    )
    opt.attach_step_hook(lambda o: steps.append(o.steps))
    grads = [torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[3.0, -1.0]]])]
    opt.signal_skip_step(True)
    opt.zero_grad()
    gs.pending.append({"weight": grads[0]})
    opt.step()
    assert torch.equal(model.weight.detach(), before) and steps == []
    opt.zero_grad()  # after a skipped step: the running sum survives
    gs.pending.append({"weight": grads[1]})
    opt.step()
    assert steps == [0]
    torch.testing.assert_close(model.weight.detach(), before - torch.tensor([[4.0, 1.0]]) / 2)


def test_noise_std_uses_the_clippers_noise_multiplier_and_sensitivity():
    class Scaled:
        """A clipper double: sensitivity 3, gradient noise multiplier 2σ."""

        max_grad_norm = 3.0

        def clip_factors(self, sq):
            return {n: torch.ones_like(v) for n, v in sq.items()}

        def sensitivity(self):
            return 3.0

        def gradient_noise_multiplier(self, sigma):
            return 2 * sigma

        def end_step(self, *, expected_batch_size, generator):
            self.ended = expected_batch_size

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    model = nn.Linear(50, 40, bias=False)
    clipper = Scaled()
    opt = dpcore.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        grad_sampler=KnownGradSampler(model),
        clipper=clipper,
        noise=get_registry().create("noise", "gaussian"),
        noise_multiplier=0.5,
        expected_batch_size=1.0,
        noise_generator=torch.Generator().manual_seed(0),
    )
    opt.step()  # no backward at all: an empty batch, noise only
    assert clipper.ended == 1.0
    sd = model.weight.grad.std().item()
    assert sd == pytest.approx(2 * 0.5 * 3.0, rel=4 / math.sqrt(2000))


def _same_tensors(found: list[torch.Tensor], expected: list[torch.Tensor]) -> bool:
    return len(found) == len(expected) and {id(t) for t in found} == {id(t) for t in expected}


def test_model_tensors_walk_like_parameters_and_buffers() -> None:
    from dpcore.optimizer import _ModelTensors

    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.BatchNorm1d(2), nn.Sequential(shared, nn.Linear(2, 3)))
    model.register_parameter("loose", nn.Parameter(torch.zeros(1)))
    params, buffers = _ModelTensors(model).current()
    assert _same_tensors(params, list(model.parameters()))
    assert _same_tensors(buffers, list(model.buffers()))


@pytest.mark.parametrize(
    "change",
    [
        "setattr_parameter",
        "register_buffer",
        "add_module",
        "module_dict_item",
        "direct_parameter_slot",
        "direct_buffer_slot",
        "delete_and_setattr",
        "direct_new_parameter_name",
        "direct_new_buffer_name",
        "direct_module_slot",
        "direct_empty_slot",
    ],
)
def test_model_tensors_follow_every_change_of_the_model(change: str) -> None:
    """The walk is cached; any way a model's tensors change makes the next call walk anew."""
    from dpcore.optimizer import _ModelTensors

    model = nn.Sequential(
        nn.Linear(2, 2), nn.BatchNorm1d(2), nn.ModuleDict(), nn.Linear(2, 2, bias=False)
    )
    prebuilt = nn.Linear(2, 1)  # registered before the walk: no hook fires when it is added
    tensors = _ModelTensors(model)
    tensors.current()
    tensors.current()
    assert tensors.version == 1  # unchanged: walked once
    if change == "setattr_parameter":
        model[0].weight = nn.Parameter(torch.zeros(2, 2))
    elif change == "register_buffer":
        model[0].register_buffer("extra", torch.zeros(1))
    elif change == "add_module":
        model.add_module("late", nn.Linear(2, 1))
    elif change == "module_dict_item":
        model[2]["adapter"] = nn.Linear(2, 2)  # how PEFT adds an adapter
    elif change == "direct_parameter_slot":
        model[0]._parameters["weight"] = nn.Parameter(torch.zeros(2, 2))  # as accelerate does
    elif change == "direct_buffer_slot":
        model[1]._buffers["running_mean"] = torch.ones(2)
    elif change == "delete_and_setattr":
        del model[0].bias
        model[0].bias = nn.Parameter(torch.zeros(2))
    # past the module API and past every registration hook:
    elif change == "direct_new_parameter_name":
        model[0]._parameters["scale"] = nn.Parameter(torch.ones(1))
    elif change == "direct_new_buffer_name":
        model[1]._buffers["extra"] = torch.ones(1)
    elif change == "direct_module_slot":
        model[2]._modules["adapter"] = prebuilt
    elif change == "direct_empty_slot":
        model[3]._parameters["bias"] = nn.Parameter(torch.zeros(2))
    params, buffers = tensors.current()
    assert tensors.version == 2
    assert _same_tensors(params, list(model.parameters()))
    assert _same_tensors(buffers, list(model.buffers()))


def test_model_tensors_keep_their_version_when_the_model_did_not_change() -> None:
    """Registrations elsewhere (another model built, functional_call swapping a tensor in
    and back) walk again but find the same tensors: CUDA graphs keyed on the version
    keep replaying."""
    from dpcore.optimizer import _ModelTensors

    model = nn.Linear(2, 2)
    tensors = _ModelTensors(model)
    tensors.current()
    nn.Linear(3, 3)
    torch.func.functional_call(model, {"weight": torch.zeros(2, 2)}, (torch.ones(1, 2),))
    params, _ = tensors.current()
    assert tensors.version == 1
    assert _same_tensors(params, list(model.parameters()))
