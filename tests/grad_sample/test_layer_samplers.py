"""Every built-in layer grad sampler, method by method, against micro-batches.

For a layer ``f`` and a random ``R`` the loss of sample ``i`` is ``<f(x_i), R_i>``,
so the output gradient is ``R`` and each sample's true gradient is that of its own
micro-batch. Norms are checked with the ghost and the instantiation strategy, and
with ``auto`` on both sides of its threshold.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import dpcore
from dpcore.builtins.layer_samplers import ConvGradSampler, LinearGradSampler
from dpcore.builtins.layer_samplers._common import use_ghost

SETTINGS = settings(max_examples=6, deadline=None, derandomize=True)


def reference(layer: nn.Module, inputs: tuple, grad_out: Tensor, call=None) -> dict[str, Tensor]:
    call = call or (lambda m, *a: m(*a))
    params = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    rows: dict[str, list[Tensor]] = {n: [] for n in params}
    for i in range(grad_out.shape[0]):
        out = call(layer, *(a if a is None else a[i : i + 1] for a in inputs))
        grads = torch.autograd.grad((out * grad_out[i : i + 1]).sum(), list(params.values()))
        for n, g in zip(params, grads, strict=True):
            rows[n].append(g)
    return {n: torch.stack(r) for n, r in rows.items()}


def check_sampler(sampler, layer: nn.Module, *inputs, atol: float = 1e-5, call=None) -> None:
    with torch.no_grad():
        out = (call or (lambda m, *a: m(*a)))(layer, *inputs)
    grad_out = torch.randn_like(out)
    ref = reference(layer, inputs, grad_out, call)
    got = sampler.per_sample_grads(layer, inputs, grad_out)
    assert set(got) == set(ref)
    factors = {n: torch.rand(grad_out.shape[0]) for n in ref}
    norms = sampler.per_sample_sq_norms(layer, inputs, grad_out)
    sums = sampler.clipped_sums(layer, inputs, grad_out, factors)
    for n, expected in ref.items():
        torch.testing.assert_close(got[n], expected, atol=atol, rtol=1e-4)
        assert norms[n].dtype == torch.float32
        torch.testing.assert_close(
            norms[n], expected.flatten(1).pow(2).sum(1), atol=atol, rtol=1e-4
        )
        torch.testing.assert_close(
            sums[n], torch.einsum("b,b...->...", factors[n], expected), atol=atol, rtol=1e-4
        )


def registered(layer: nn.Module):
    sampler = dpcore.get_registry().layer_grad_sampler_for(layer)
    assert sampler is not None, type(layer)
    return sampler


STRATEGIES = ["auto", "ghost", "instantiate"]


# -- Linear -------------------------------------------------------------------------------
@SETTINGS
@given(
    batch=st.integers(1, 4),
    seq=st.sampled_from([(), (1,), (5,), (2, 3)]),
    d=st.integers(1, 6),
    p=st.integers(1, 6),
    bias=st.booleans(),
)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_linear(strategy: str, batch: int, seq: tuple, d: int, p: int, bias: bool) -> None:
    torch.manual_seed(batch * 7 + d)
    layer = nn.Linear(d, p, bias=bias)
    check_sampler(LinearGradSampler(strategy), layer, torch.randn(batch, *seq, d))


def test_linear_auto_threshold_both_sides() -> None:
    # T=3, d=p=4: 2*9 <= 16 is False -> instantiate; T=2: 8 <= 16 -> ghost
    assert not use_ghost("auto", 3, 16)
    assert use_ghost("auto", 2, 16)
    for seq in (2, 3, 40):
        layer = nn.Linear(4, 4)
        check_sampler(registered(layer), layer, torch.randn(3, seq, 4))


def test_linear_merge_calls_equals_sum_of_calls() -> None:
    layer = nn.Linear(3, 2)
    a1, a2 = torch.randn(4, 3), torch.randn(4, 5, 3)
    g1, g2 = torch.randn(4, 2), torch.randn(4, 5, 2)
    s = LinearGradSampler()
    merged = s.merge_calls([((a1,), g1), ((a2,), g2)])
    got = s.per_sample_grads(layer, *merged)
    want = s.per_sample_grads(layer, (a1,), g1)
    for n, g in s.per_sample_grads(layer, (a2,), g2).items():
        want[n] = want[n] + g
    for n in want:
        torch.testing.assert_close(got[n], want[n])
    norms = s.per_sample_sq_norms(layer, *merged)
    for n in want:
        torch.testing.assert_close(norms[n], want[n].flatten(1).pow(2).sum(1), rtol=1e-4, atol=1e-5)


# -- Convolutions ---------------------------------------------------------------------------
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@SETTINGS
@given(
    dims=st.sampled_from([1, 2, 3]),
    batch=st.integers(1, 3),
    groups=st.sampled_from([1, 2]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.sampled_from([0, 1, "same", "valid"]),
    padding_mode=st.sampled_from(["zeros", "reflect", "circular"]),
    bias=st.booleans(),
)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_conv(
    strategy, dims, batch, groups, kernel, stride, dilation, padding, padding_mode, bias
) -> None:
    if padding == "same":
        stride = 1
    torch.manual_seed(dims * 13 + kernel)
    layer = CONV[dims](
        2 * groups,
        2 * groups,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        padding_mode=padding_mode,
    )
    size = {1: (9,), 2: (6, 5), 3: (5, 4, 5)}[dims]
    check_sampler(ConvGradSampler(strategy), layer, torch.randn(batch, 2 * groups, *size))


@pytest.mark.parametrize("size", [2, 12])  # few output positions -> ghost; many -> instantiate
def test_conv_auto_threshold_both_sides(size: int) -> None:
    layer = nn.Conv2d(3, 4, 3, padding=1)
    positions = size * size
    assert use_ghost("auto", positions, 4 * 27) == (size == 2)
    check_sampler(registered(layer), layer, torch.randn(2, 3, size, size))


# -- Embeddings ----------------------------------------------------------------------------------
@SETTINGS
@given(
    batch=st.integers(1, 4),
    shape=st.sampled_from([(), (1,), (6,), (2, 3)]),
    padding_idx=st.sampled_from([None, 0, 2]),
    freq=st.booleans(),
)
def test_embedding(batch: int, shape: tuple, padding_idx, freq: bool) -> None:
    layer = nn.Embedding(5, 3, padding_idx=padding_idx, scale_grad_by_freq=freq)
    check_sampler(registered(layer), layer, torch.randint(0, 5, (batch, *shape)))


def test_embedding_broadcast_ids() -> None:
    layer = nn.Embedding(8, 3)
    ids = torch.arange(6).expand(4, 6)  # position ids: non-contiguous, stride 0 over the batch
    check_sampler(registered(layer), layer, ids)


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("padding_idx", [None, 1])
@pytest.mark.parametrize("weighted", [False, True])
def test_embedding_bag_2d(mode: str, padding_idx, weighted: bool) -> None:
    if weighted and mode != "sum":
        pytest.skip("per_sample_weights need mode='sum'")
    layer = nn.EmbeddingBag(6, 3, mode=mode, padding_idx=padding_idx)
    ids = torch.randint(0, 6, (4, 5))
    if weighted:
        check_sampler(
            registered(layer),
            layer,
            ids,
            None,
            torch.rand(4, 5),
            call=lambda m, i, o, w: m(i, o, per_sample_weights=w),
        )
    else:
        check_sampler(registered(layer), layer, ids)


def test_embedding_bag_offsets() -> None:
    layer = nn.EmbeddingBag(6, 3, mode="mean")
    sampler = registered(layer)
    ids = torch.tensor([1, 2, 4, 5, 4, 3, 2, 0])
    offsets = torch.tensor([0, 2, 2, 5])  # bag 1 empty
    with torch.no_grad():
        out = layer(ids, offsets)
    g = torch.randn_like(out)
    bags = [ids[0:2], ids[2:2], ids[2:5], ids[5:]]
    ref = []
    for i, bag in enumerate(bags):
        w = layer.weight.detach().clone().requires_grad_(True)
        o = torch.nn.functional.embedding_bag(bag, w, torch.tensor([0]), mode="mean")
        ref.append(torch.autograd.grad((o * g[i : i + 1]).sum(), w)[0])
    got = sampler.per_sample_grads(layer, (ids, offsets), g)["weight"]
    torch.testing.assert_close(got, torch.stack(ref))
    norms = sampler.per_sample_sq_norms(layer, (ids, offsets), g)["weight"]
    torch.testing.assert_close(norms, torch.stack(ref).flatten(1).pow(2).sum(1))


# -- Normalisation layers ---------------------------------------------------------------------
NORMS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {
    "layernorm": lambda: (nn.LayerNorm(4), (3, 5, 4)),
    "layernorm2d": lambda: (nn.LayerNorm((3, 4)), (3, 2, 3, 4)),
    "layernorm_nobias": lambda: (nn.LayerNorm(4, bias=False), (3, 4)),
    "groupnorm": lambda: (nn.GroupNorm(2, 4), (3, 4, 5)),
    "groupnorm2d": lambda: (nn.GroupNorm(2, 4), (3, 4, 3, 2)),
    "instancenorm1d": lambda: (nn.InstanceNorm1d(3, affine=True), (2, 3, 6)),
    "instancenorm2d": lambda: (nn.InstanceNorm2d(3, affine=True), (2, 3, 4, 5)),
    "instancenorm3d": lambda: (nn.InstanceNorm3d(3, affine=True), (2, 3, 3, 2, 4)),
    "rmsnorm": lambda: (nn.RMSNorm(4), (3, 5, 4)),
    "rmsnorm_eps": lambda: (nn.RMSNorm([2, 4], eps=1e-3), (3, 2, 4)),
}


@pytest.mark.parametrize("case", sorted(NORMS))
def test_norm_layers(case: str) -> None:
    torch.manual_seed(0)
    layer, shape = NORMS[case]()
    with torch.no_grad():  # non-trivial affine parameters
        for p in layer.parameters():
            p.normal_()
    check_sampler(registered(layer), layer, torch.randn(*shape))


def test_frozen_bias_is_left_out() -> None:
    layer = nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    check_sampler(registered(layer), layer, torch.randn(4, 3))


def test_norms_in_float32_under_bfloat16() -> None:
    layer = nn.Linear(4, 3).to(torch.bfloat16)
    a = torch.randn(2, 5, 4, dtype=torch.bfloat16)
    g = torch.randn(2, 5, 3, dtype=torch.bfloat16)
    for strategy in STRATEGIES:
        norms = LinearGradSampler(strategy).per_sample_sq_norms(layer, (a,), g)
        want = torch.einsum("btp,btd->bpd", g.float(), a.float()).flatten(1).pow(2).sum(1)
        assert norms["weight"].dtype == torch.float32
        torch.testing.assert_close(norms["weight"], want, rtol=1e-5, atol=1e-5)
    # mixed dtypes as recorded under autocast: float32 input, bfloat16 output gradient
    sums = LinearGradSampler().clipped_sums(
        nn.Linear(4, 3), (a.float(),), g, {"weight": torch.ones(2), "bias": torch.ones(2)}
    )
    assert sums["weight"].dtype == torch.float32


EMPTY = {
    "linear": (nn.Linear(3, 2), (0, 4, 3)),
    "conv2d": (nn.Conv2d(2, 4, 3, padding=1, groups=2), (0, 2, 5, 5)),
    "conv1d_same": (nn.Conv1d(2, 2, 3, padding="same"), (0, 2, 6)),
    "layernorm": (nn.LayerNorm(3), (0, 4, 3)),
    "groupnorm": (nn.GroupNorm(1, 2), (0, 2, 4)),
    "rmsnorm": (nn.RMSNorm(3), (0, 3)),
}


@pytest.mark.parametrize("case", sorted(EMPTY))
def test_empty_batch(case: str) -> None:
    layer, shape = EMPTY[case]
    x = torch.randn(*shape)
    with torch.no_grad():
        g = torch.randn_like(layer(x))
    sampler = registered(layer)
    grads = sampler.per_sample_grads(layer, (x,), g)
    norms = sampler.per_sample_sq_norms(layer, (x,), g)
    sums = sampler.clipped_sums(layer, (x,), g, {n: torch.ones(0) for n in grads})
    for name, p in layer.named_parameters():
        assert grads[name].shape == (0, *p.shape)
        assert norms[name].shape == (0,)
        assert torch.equal(sums[name], torch.zeros_like(p))


def test_empty_batch_embedding() -> None:
    layer = nn.Embedding(5, 3)
    ids = torch.zeros(0, 4, dtype=torch.long)
    g = torch.randn(0, 4, 3)
    sampler = registered(layer)
    assert sampler.per_sample_grads(layer, (ids,), g)["weight"].shape == (0, 5, 3)
    assert sampler.per_sample_sq_norms(layer, (ids,), g)["weight"].shape == (0,)
    assert not sampler.clipped_sums(layer, (ids,), g, {"weight": torch.ones(0)})["weight"].any()
