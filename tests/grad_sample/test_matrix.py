"""The matrix: every built-in layer sampler x every grad sampler that supports it x
(batch_first, loss_reduction), against micro-batches of size one, on
hypothesis-generated shapes.

Each case wraps one layer in a tiny model whose output is ``[B, k]``; the loss of a
sample is the squared distance to a random target, reduced over the batch as
``loss_reduction`` says. A grad sampler that cannot serve a case must say so with a
clear error (the table ``UNSUPPORTED``), never give a wrong answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import dpcore
from dpcore.layers import DPGRU, DPLSTM, DPRNN, DPMultiheadAttention
from dpcore.verify import check_per_sample_gradients

# the built-in grad samplers (third-party ones are tested by their own distributions)
MODES = [e.name for e in dpcore.get_registry().entries("grad_sampler") if e.provider == "dpcore"]


@dataclass
class Case:
    model: nn.Module
    inputs: Tensor
    seq_first_ok: bool = True  # the layer can sit in a sequence-first model


class SeqHead(nn.Module):
    """``layer`` on ``[B, T, ...]`` (or ``[T, B, ...]``), mean over T, linear head."""

    def __init__(self, layer: nn.Module, width: int, batch_first: bool, unpack: bool = False):
        super().__init__()
        self.layer, self.batch_first, self.unpack = layer, batch_first, unpack
        self.head = nn.Linear(width, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer(x)
        if self.unpack:
            h = h[0]
        time_dim = 1 if self.batch_first else 0
        if h.dim() > 2:
            h = h.mean(time_dim)
        return self.head(h.flatten(1))


class ImageHead(nn.Module):
    """``layer`` on ``[B, C, *spatial]``, mean over space, linear head."""

    def __init__(self, layer: nn.Module, channels: int):
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(channels, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x).flatten(2).mean(2))


class SelfAttention(nn.Module):
    def __init__(self, attention: DPMultiheadAttention):
        super().__init__()
        self.attention = attention

    def forward(self, x: Tensor) -> Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


def seq_input(draw, batch: int, batch_first: bool, *feature: int, ids: int | None = None) -> Tensor:
    steps = draw(st.integers(1, 4))
    shape = (batch, steps) if batch_first else (steps, batch)
    if ids is not None:
        return torch.randint(0, ids, shape)
    return torch.randn(*shape, *feature)


def build(name: str, draw, batch: int, batch_first: bool) -> Case:
    d = draw(st.integers(1, 5))
    if name == "linear_2d":
        p = draw(st.integers(1, 4))
        return Case(
            nn.Sequential(nn.Linear(d, p), nn.Tanh(), nn.Linear(p, 2)), torch.randn(batch, d), False
        )
    if name == "linear_seq":
        p = draw(st.integers(1, 4))
        return Case(
            SeqHead(nn.Linear(d, p, bias=draw(st.booleans())), p, batch_first),
            seq_input(draw, batch, batch_first, d),
        )
    if name.startswith("conv"):
        dims = int(name[4])
        conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        groups = draw(st.sampled_from([1, 2]))
        padding = draw(st.sampled_from([0, 1, "same"]))
        stride = 1 if padding == "same" else draw(st.integers(1, 2))
        layer = conv_cls(
            2 * groups,
            2,
            2,
            stride=stride,
            padding=padding,
            dilation=draw(st.integers(1, 2)),
            groups=groups,
        )
        size = [draw(st.integers(3, 5)) for _ in range(dims)]
        return Case(ImageHead(layer, 2), torch.randn(batch, 2 * groups, *size), False)
    if name == "embedding":
        layer = nn.Embedding(7, d, padding_idx=draw(st.sampled_from([None, 0])))
        return Case(SeqHead(layer, d, batch_first), seq_input(draw, batch, batch_first, ids=7))
    if name == "embedding_bag":
        layer = nn.EmbeddingBag(7, d, mode=draw(st.sampled_from(["sum", "mean"])))
        return Case(
            SeqHead(layer, d, True), torch.randint(0, 7, (batch, draw(st.integers(1, 4)))), False
        )
    if name == "layer_norm":
        return Case(
            SeqHead(nn.LayerNorm(d), d, batch_first), seq_input(draw, batch, batch_first, d)
        )
    if name == "rms_norm":
        return Case(SeqHead(nn.RMSNorm(d), d, batch_first), seq_input(draw, batch, batch_first, d))
    if name == "group_norm":
        return Case(
            ImageHead(nn.GroupNorm(2, 4), 4), torch.randn(batch, 4, draw(st.integers(2, 5))), False
        )
    if name.startswith("instance_norm"):
        dims = int(name[-2])
        norm_cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]
        size = [draw(st.integers(2, 3)) for _ in range(dims)]
        return Case(ImageHead(norm_cls(3, affine=True), 3), torch.randn(batch, 3, *size), False)
    if name in ("dp_lstm", "dp_gru", "dp_rnn"):
        cls = {"dp_lstm": DPLSTM, "dp_gru": DPGRU, "dp_rnn": DPRNN}[name]
        bidirectional = draw(st.booleans())
        layer = cls(d, 3, batch_first=batch_first, bidirectional=bidirectional)
        width = 6 if bidirectional else 3
        return Case(
            SeqHead(layer, width, batch_first, unpack=True), seq_input(draw, batch, batch_first, d)
        )
    if name == "dp_attention":
        attention = DPMultiheadAttention(
            4, 2, batch_first=batch_first, add_bias_kv=draw(st.booleans())
        )
        return Case(
            SeqHead(SelfAttention(attention), 4, batch_first),
            seq_input(draw, batch, batch_first, 4),
        )
    raise AssertionError(name)


LAYERS = [
    "linear_2d", "linear_seq", "conv1d", "conv2d", "conv3d", "embedding", "embedding_bag",
    "layer_norm", "rms_norm", "group_norm", "instance_norm1d", "instance_norm2d", "instance_norm3d",
    "dp_lstm", "dp_gru", "dp_rnn", "dp_attention",
]  # fmt: skip

#: (mode, layer) pairs where the mode may refuse with a clear error (never a wrong answer)
UNSUPPORTED: dict[str, set[str]] = {
    "ew": {"embedding_bag", "rms_norm", "dp_attention", "embedding"},
}
#: modes that may refuse sequence-first models (with a clear error)
REFUSE_SEQ_FIRST = {"ew", "ghost", "bk"}


def loss_fn_for(reduction: str) -> Callable[[Tensor, Tensor], Tensor]:
    def loss(out: Tensor, target: Tensor) -> Tensor:
        per_sample = (out - target).pow(2).sum(1)
        return per_sample.mean() if reduction == "mean" else per_sample.sum()

    return loss


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@settings(max_examples=1, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_matrix(layer: str, mode: str, batch_first: bool, reduction: str, data) -> None:
    batch = data.draw(st.integers(1, 3), label="batch")
    torch.manual_seed(batch)
    case = build(layer, data.draw, batch, batch_first)
    if not batch_first and not case.seq_first_ok:
        return  # images, bags and 2-D inputs have no sequence-first layout
    target = torch.randn(batch, 2)
    report = check_per_sample_gradients(
        case.model, case.inputs, target, loss_fn_for(reduction), mode,
        batch_first=batch_first, loss_reduction=reduction, atol=1e-5, rtol=1e-3,
    )  # fmt: skip
    refused = mode in REFUSE_SEQ_FIRST and not batch_first
    if refused or layer in UNSUPPORTED.get(mode, set()):
        if report.error is not None:
            assert "GradSampleError" in report.error, report.error
            return
    assert report.ok, report.summary()
