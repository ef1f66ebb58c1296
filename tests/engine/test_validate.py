"""ModuleValidator: problems with module paths, fixes that keep the weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dpcore
from dpcore import ModuleValidator
from dpcore.errors import UnsupportedModuleError

from .conftest import dataset, loader


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))
        self.register_buffer("seen", torch.zeros(3))

    def forward(self, x):
        return x * self.weight


def messy() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.Sequential(nn.InstanceNorm2d(8, affine=True, track_running_stats=True)),
        nn.Flatten(),
    )


def test_validate_lists_every_problem_with_its_path():
    model = nn.ModuleDict(
        {
            "cnn": messy(),
            "rnn": nn.LSTM(4, 5),
            "gru": nn.GRU(4, 5),
            "plain_rnn": nn.RNN(4, 5),
            "attn": nn.MultiheadAttention(8, 2),
            "odd": WithBuffer(),
            "frozen": nn.Linear(2, 2),
        }
    )
    problems = ModuleValidator.validate(model)
    text = "\n".join(problems)
    for where in (
        "cnn.1 (BatchNorm2d)",
        "cnn.2.0 (InstanceNorm2d)",
        "rnn (LSTM)",
        "gru (GRU)",
        "plain_rnn (RNN)",
        "attn (MultiheadAttention)",
        "odd (WithBuffer)",
    ):
        assert where in text, where
    assert len(problems) == 7
    assert "frozen" not in text
    assert not ModuleValidator.is_valid(model)
    with pytest.raises(UnsupportedModuleError, match=r"cnn\.1"):
        ModuleValidator.validate(model, strict=True)


def test_sync_batchnorm_is_a_problem_too():
    assert ModuleValidator.validate(nn.SyncBatchNorm(4))


def test_fix_replaces_batchnorm_with_groupnorm_keeping_affine_weights():
    model = messy()
    with torch.no_grad():
        model[1].weight.uniform_()
        model[1].bias.uniform_()
    weight = model[1].weight.detach().clone()
    fixed = ModuleValidator.fix(model)
    assert isinstance(fixed[1], nn.GroupNorm) and fixed[1].num_groups == 8
    assert torch.equal(fixed[1].weight.detach(), weight)
    assert not fixed[2][0].track_running_stats
    assert ModuleValidator.validate(fixed) == []
    assert fixed(torch.randn(2, 3, 6, 6)).shape == (2, 8 * 4 * 4)


def test_fix_replaces_the_root_and_leaves_unfixable_problems_listed():
    assert isinstance(ModuleValidator.fix(nn.BatchNorm1d(6)), nn.GroupNorm)
    model = nn.Sequential(WithBuffer(), nn.BatchNorm1d(3))
    fixed = ModuleValidator.fix(model)
    problems = ModuleValidator.validate(fixed)
    assert len(problems) == 1 and "0 (WithBuffer)" in problems[0]


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_fix_replaces_recurrent_layers_with_the_same_function(kind):
    layers = pytest.importorskip("dpcore.layers")
    if not hasattr(layers, f"DP{kind}"):
        pytest.skip(f"dpcore.layers.DP{kind} not available")
    torch.manual_seed(0)
    original = getattr(nn, kind)(4, 5, num_layers=2, batch_first=True)
    x = torch.randn(3, 7, 4)
    expected = original(x)[0]
    fixed = ModuleValidator.fix(nn.Sequential(original))[0]
    assert type(fixed).__name__ == f"DP{kind}"
    assert ModuleValidator.validate(fixed) == []
    torch.testing.assert_close(fixed(x)[0], expected, atol=1e-5, rtol=1e-4)


def test_fix_replaces_multihead_attention_with_the_same_function():
    layers = pytest.importorskip("dpcore.layers")
    if not hasattr(layers, "DPMultiheadAttention"):
        pytest.skip("dpcore.layers.DPMultiheadAttention not available")
    torch.manual_seed(0)
    original = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    expected = original(x, x, x)[0]
    fixed = ModuleValidator.fix(original)
    assert type(fixed).__name__ == "DPMultiheadAttention"
    assert ModuleValidator.validate(fixed) == []
    torch.testing.assert_close(fixed(x, x, x)[0], expected, atol=1e-5, rtol=1e-4)


def test_make_private_refuses_an_invalid_model_with_the_list(accountant_name):
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    with pytest.raises(
        UnsupportedModuleError, match=r"(?s)1 \(BatchNorm1d\).*ModuleValidator\.fix"
    ):
        dpcore.PrivacyEngine(accountant=accountant_name).make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader(dataset(), 12),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )


def test_fixed_recurrent_model_trains_privately(accountant_name):
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(6, 8, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.rnn(x.unsqueeze(1).repeat(1, 4, 1))[0][:, -1])

    model = ModuleValidator.fix(Tagger())
    engine = dpcore.PrivacyEngine(accountant=accountant_name)
    model, opt, dl = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader(dataset(24), 8),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        seed=0,
    )
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in dl:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert engine.steps == 3
    assert all(
        not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True)
    )


def test_layers_without_a_layer_grad_sampler_are_listed_for_samplers_that_need_one(fresh_registry):
    from dpcore.registry import PluginInfo, get_registry

    def strict_factory(**options):
        raise AssertionError("not built by validate")

    strict_factory.needs_layer_grad_samplers = True
    registry = get_registry()
    registry._add(PluginInfo("grad_sampler", "strict", "tests", "", "t", "t", obj=strict_factory))

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.scale

    model = nn.Sequential(nn.Linear(3, 3), Custom())
    assert ModuleValidator.validate(model, grad_sample_mode="hooks") == []
    problems = ModuleValidator.validate(model, grad_sample_mode="strict")
    assert len(problems) == 1 and problems[0].startswith("1 (Custom): grad_sample_mode 'strict'")
