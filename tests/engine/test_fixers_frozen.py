"""``ModuleValidator.fix`` keeps frozen parameters frozen when it replaces torch's RNNs and
MultiheadAttention by dpcore.layers versions, whose parameters have other names."""

from __future__ import annotations

import pytest
from torch import nn

from dpcore import ModuleValidator


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_recurrent_layers_keep_frozen_parameters_frozen(kind: str) -> None:
    original = getattr(nn, kind)(4, 5, num_layers=2, bidirectional=True, batch_first=True)
    frozen = {"weight_ih_l0", "bias_hh_l1_reverse"}
    for name in frozen:
        getattr(original, name).requires_grad_(False)
    fixed = ModuleValidator.fix(nn.Sequential(original))[0]
    mapping = fixed.torch_parameter_names()
    assert set(mapping) == {n for n, _ in original.named_parameters()}
    ours = dict(fixed.named_parameters())
    for torch_name, names in mapping.items():
        for name in names:
            assert ours[name].requires_grad == (torch_name not in frozen), (torch_name, name)
    assert sum(not p.requires_grad for p in fixed.parameters()) == len(frozen)


@pytest.mark.parametrize("same_dims", [True, False])
def test_multihead_attention_keeps_frozen_parameters_frozen(same_dims: bool) -> None:
    kw = {} if same_dims else {"kdim": 6, "vdim": 3}
    original = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True, **kw)
    weight = "in_proj_weight" if same_dims else "k_proj_weight"
    frozen = {weight, "bias_v", "out_proj.bias"}
    for name in frozen:
        original.get_parameter(name).requires_grad_(False)
    fixed = ModuleValidator.fix(original)
    ours = dict(fixed.named_parameters())
    want_frozen = {ours_name for n in frozen for ours_name in fixed.torch_parameter_names()[n]}
    assert want_frozen  # the mapping names every frozen torch parameter
    for name, p in ours.items():
        assert p.requires_grad == (name not in want_frozen), name
    if same_dims:  # in_proj_weight is split into the three projections
        assert {"q_proj.weight", "k_proj.weight", "v_proj.weight"} <= want_frozen
