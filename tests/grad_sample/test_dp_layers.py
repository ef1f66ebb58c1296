"""DP layers: same outputs as the torch modules with copied weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from dpcore.layers import DPGRU, DPLSTM, DPRNN, DPMultiheadAttention

RNNS = [
    (nn.LSTM, DPLSTM, {}),
    (nn.LSTM, DPLSTM, {"proj_size": 3}),
    (nn.GRU, DPGRU, {}),
    (nn.RNN, DPRNN, {}),
    (nn.RNN, DPRNN, {"nonlinearity": "relu", "bias": False}),
]


def assert_same(a, b) -> None:
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, PackedSequence):
        torch.testing.assert_close(a.data, b.data)
        torch.testing.assert_close(a.batch_sizes, b.batch_sizes)
    else:
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("torch_cls", "dp_cls", "kwargs"), RNNS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_rnn_matches_torch(
    torch_cls, dp_cls, kwargs, batch_first: bool, bidirectional: bool
) -> None:
    torch.manual_seed(0)
    ref = torch_cls(
        5, 4, num_layers=2, batch_first=batch_first, bidirectional=bidirectional, **kwargs
    )
    dp = dp_cls(5, 4, num_layers=2, batch_first=batch_first, bidirectional=bidirectional, **kwargs)
    dp.load_state_dict(ref.state_dict())
    x = torch.randn(3, 6, 5) if batch_first else torch.randn(6, 3, 5)
    assert_same(ref(x), dp(x))
    assert_same(
        ref(x[0] if batch_first else x[:, 0]), dp(x[0] if batch_first else x[:, 0])
    )  # unbatched
    packed = pack_padded_sequence(
        x, torch.tensor([6, 2, 4]), batch_first=batch_first, enforce_sorted=False
    )
    assert_same(ref(packed), dp(packed))
    h = ref(x)[1]
    assert_same(ref(x, h), dp(x, h))  # initial state


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"add_bias_kv": True}, {"add_zero_attn": True}, {"kdim": 3, "vdim": 7}, {"bias": False}],
)
@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_matches_torch(kwargs: dict, batch_first: bool) -> None:
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, batch_first=batch_first, **kwargs)
    dp = DPMultiheadAttention(8, 2, batch_first=batch_first, **kwargs)
    dp.load_state_dict(ref.state_dict())
    q, k, v = (
        torch.randn(3, 4, 8),
        torch.randn(3, 5, kwargs.get("kdim", 8)),
        torch.randn(3, 5, kwargs.get("vdim", 8)),
    )
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    mask = torch.randn(4, 5)
    assert_same(ref(q, k, v), dp(q, k, v))
    assert_same(
        ref(q, k, v, key_padding_mask=padding.float() * -1e9, attn_mask=mask),
        dp(q, k, v, key_padding_mask=padding.float() * -1e9, attn_mask=mask),
    )
    assert_same(ref(q, k, v, average_attn_weights=False), dp(q, k, v, average_attn_weights=False))
    if "kdim" not in kwargs:  # self-attention with a causal mask
        causal = nn.Transformer.generate_square_subsequent_mask(4)
        assert_same(ref(q, q, q, attn_mask=causal), dp(q, q, q, attn_mask=causal))


def test_constructor_errors_like_torch() -> None:
    with pytest.raises(ValueError):
        DPGRU(3, 4, proj_size=2)
    with pytest.raises(ValueError):
        DPMultiheadAttention(7, 2)
    with pytest.raises(ValueError):
        DPRNN(3, 4, nonlinearity="gelu")


@pytest.mark.parametrize(
    ("torch_module", "dp_module"),
    [
        (
            nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2),
            DPLSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2),
        ),
        (nn.GRU(3, 4, bias=False), DPGRU(3, 4, bias=False)),
        (
            nn.MultiheadAttention(8, 2, add_bias_kv=True),
            DPMultiheadAttention(8, 2, add_bias_kv=True),
        ),
        (nn.MultiheadAttention(8, 2, kdim=3, vdim=5), DPMultiheadAttention(8, 2, kdim=3, vdim=5)),
    ],
)
def test_torch_parameter_names_cover_both_sides(
    torch_module: nn.Module, dp_module: nn.Module
) -> None:
    names = dp_module.torch_parameter_names()
    assert set(names) == {n for n, _ in torch_module.named_parameters()}
    assert sorted(n for group in names.values() for n in group) == sorted(
        n for n, _ in dp_module.named_parameters()
    )
