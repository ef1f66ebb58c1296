"""``ghost`` and ``bk`` against micro-batches of size one, for every layer type they tap
or record, both sides of the ghost/instantiate choice, and the edge cases that make
fast clipping silently wrong elsewhere (broadcast inputs, reused modules, tied and
frozen parameters, autocast)."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpcore.builtins.grad_samplers.bk import BookKeepingGradSampler
from dpcore.builtins.grad_samplers.ghost import GhostGradSampler
from dpcore.errors import GradSampleError
from dpcore.registry import get_registry

MODES = ["bk", "ghost"]
#: the same checks run on a GPU with DPCORE_TEST_DEVICE=cuda (benchmarks/README.md)
DEVICE = torch.device(os.environ.get("DPCORE_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda":  # compare float32 with float32: cuDNN would use TF32 by default
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
PerSampleLoss = Callable[[Tensor, Tensor], Tensor]


SAMPLERS = {"bk": BookKeepingGradSampler, "ghost": GhostGradSampler}


def make(mode: str, model: nn.Module, **kw):
    gs = SAMPLERS[mode]()
    gs.attach(model, **kw)
    return gs


def reference(
    model: nn.Module, x: Tensor, y: Tensor, loss_fn: PerSampleLoss, batch_first: bool = True
) -> dict[str, Tensor]:
    """Per-sample gradients by micro-batches of size one."""
    dim = 0 if batch_first else 1
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows: dict[str, list[Tensor]] = {n: [] for n in params}
    for i in range(x.shape[dim]):
        xi = x.narrow(dim, i, 1)
        yi = y.narrow(dim, i, 1) if y.dim() > dim else y[i : i + 1]
        loss = loss_fn(model(xi), yi).sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, p), g in zip(params.items(), grads, strict=True):
            rows[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(r) for n, r in rows.items()}


def run(
    mode: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: PerSampleLoss,
    *,
    loss_reduction: str = "mean",
    batch_first: bool = True,
    autocast: bool = False,
):
    gs = make(mode, model, batch_first=batch_first, loss_reduction=loss_reduction)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
        losses = loss_fn(out, y)
    loss = losses.mean() if loss_reduction == "mean" else losses.sum()
    loss.backward()
    assert gs.has_pending()
    norms = gs.per_sample_sq_norms()
    batch = x.shape[0 if batch_first else 1]
    gen = torch.Generator().manual_seed(1)
    factors = {n: torch.rand(batch, generator=gen).to(DEVICE) for n in norms}
    sums = gs.clipped_sums(factors)
    assert not gs.has_pending()
    return gs, norms, factors, sums


def check(
    mode: str,
    build: Callable[[], nn.Module],
    x: Tensor,
    y: Tensor,
    loss_fn: PerSampleLoss,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    **kw,
) -> None:
    torch.manual_seed(0)
    model = build().to(DEVICE)
    x, y = x.to(DEVICE), y.to(DEVICE)
    ref_model = copy.deepcopy(model)
    gs, norms, factors, sums = run(mode, model, x, y, loss_fn, **kw)
    ref = reference(ref_model, x, y, loss_fn, kw.get("batch_first", True))
    assert set(norms) == set(ref) == set(sums) == set(gs.named_parameters())
    for name, g in ref.items():
        want = g.flatten(1).pow(2).sum(1)
        torch.testing.assert_close(norms[name], want, rtol=rtol, atol=atol, msg=name)
        want_sum = torch.einsum("b,b...->...", factors[name], g)
        torch.testing.assert_close(sums[name], want_sum, rtol=rtol, atol=atol, msg=name)
    for p in model.parameters():  # fast samplers never leave tapped weights' raw sums
        if p.grad is not None:
            assert not any(p is u.layer.weight for u in gs.units if u.tapped)
    gs.detach()


def ce_per_sample(out: Tensor, y: Tensor) -> Tensor:
    """Cross entropy summed over any sequence positions, one value per sample."""
    loss = F.cross_entropy(out.flatten(0, -2).float(), y.flatten(), reduction="none")
    return loss.view(y.shape).flatten(1).sum(1) if y.dim() > 1 else loss


# ----------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))


class TinyGPT(nn.Module):
    """Token + broadcast position embeddings, LayerNorm, linear layers on sequences.

    Widths are chosen so that one linear layer is ghost-normed (2T² < p·d) and the
    other instantiated (2T² > p·d) in the automatic choice.
    """

    def __init__(
        self,
        vocab: int = 11,
        d: int = 16,
        seq: int = 5,
        tied: bool = False,
        frozen_first: bool = False,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 3)  # 2T² = 50 > 48: instantiate
        self.down = nn.Linear(3, d)  # 50 > 48
        self.mix = nn.Linear(d, d)  # 50 < 256: ghost
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight
        if frozen_first:
            self.mix.requires_grad_(False)

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)[None]  # [1, T]: broadcast
        h = self.tok(ids) + self.pos(pos)
        h = h + self.down(F.gelu(self.up(self.norm(h))))
        h = h + self.mix(h)
        return self.head(h)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)  # 2L² = 2*64² >> 108: instantiate
        self.gn = nn.GroupNorm(2, 4)
        self.c2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=False)
        self.c3 = nn.Conv2d(8, 16, 2, stride=2, dilation=1)  # L = 4: 2L²=32 < 512: ghost
        self.c4 = nn.Conv1d(16, 4, 1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.gn(self.c1(x)))
        h = F.relu(self.c3(F.relu(self.c2(h))))  # [B, 16, 2, 2]
        h = self.c4(h.flatten(2))  # [B, 4, 4]
        return self.fc(h.flatten(1))


class Reused(nn.Module):
    """One linear layer applied twice per forward (its contributions add up)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)
        self.ln = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln(torch.tanh(self.shared(self.inp(x))))
        h = self.ln(torch.tanh(self.shared(h)))
        return self.out(h)


def seq_data(b: int = 4, t: int = 5, vocab: int = 11) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(vocab, (b, t), generator=g), torch.randint(vocab, (b, t), generator=g)


# ----------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mlp(mode: str, reduction: str) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 6, generator=g), torch.randint(5, (7,), generator=g)
    check(mode, mlp, x, y, ce_per_sample, loss_reduction=reduction)


@pytest.mark.parametrize("mode", MODES)
def test_sequence_model_with_broadcast_positions(mode: str) -> None:
    x, y = seq_data()
    check(mode, TinyGPT, x, y, ce_per_sample)


@pytest.mark.parametrize("mode", MODES)
def test_tied_embedding_and_head(mode: str) -> None:
    x, y = seq_data()
    check(mode, lambda: TinyGPT(tied=True), x, y, ce_per_sample)


@pytest.mark.parametrize("mode", MODES)
def test_frozen_layer_is_not_recorded(mode: str) -> None:
    x, y = seq_data()
    check(mode, lambda: TinyGPT(frozen_first=True), x, y, ce_per_sample)
    model = TinyGPT(frozen_first=True)
    gs = make(mode, model)
    assert all(u.layer is not model.mix for u in gs.units)
    assert "mix.weight" not in gs.named_parameters()


@pytest.mark.parametrize("mode", MODES)
def test_conv_groupnorm(mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, 8, 8, generator=g), torch.randint(3, (5,), generator=g)
    check(mode, TinyCNN, x, y, ce_per_sample)


@pytest.mark.parametrize("mode", MODES)
def test_reused_module(mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 4, generator=g), torch.randint(3, (6,), generator=g)
    check(mode, Reused, x, y, ce_per_sample)


@pytest.mark.parametrize("mode", MODES)
def test_batch_second(mode: str) -> None:
    x, y = seq_data()
    check(
        mode,
        lambda: nn.Sequential(
            nn.Embedding(11, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 11)
        ),
        x.T.contiguous(),
        y.T.contiguous(),
        lambda o, t: ce_per_sample(o.transpose(0, 1), t.transpose(0, 1)),
        batch_first=False,
    )


@pytest.mark.parametrize("mode", MODES)
def test_bf16_autocast_norms(mode: str) -> None:
    x, y = seq_data(b=6)
    torch.manual_seed(0)
    model = TinyGPT().to(DEVICE)
    x, y = x.to(DEVICE), y.to(DEVICE)
    ref = reference(copy.deepcopy(model), x, y, ce_per_sample)
    _, norms, factors, sums = run(mode, model, x, y, ce_per_sample, autocast=True)
    for name, g in ref.items():
        assert norms[name].dtype == torch.float32
        want = g.flatten(1).pow(2).sum(1)
        torch.testing.assert_close(norms[name], want, rtol=0.05, atol=1e-3, msg=name)
        want_sum = torch.einsum("b,b...->...", factors[name], g)
        torch.testing.assert_close(sums[name], want_sum, rtol=0.05, atol=2e-2, msg=name)
        assert sums[name].dtype == torch.float32


def test_ghost_refuses_loss_inside_forward() -> None:
    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x).pow(2).mean()

    gs = make("ghost", WithLoss())
    with pytest.raises(GradSampleError, match="'bk'"):
        gs.module(torch.randn(4, 3))


@pytest.mark.parametrize("mode", MODES)
def test_detach_restores_module(mode: str) -> None:
    model = TinyGPT()
    gs = make(mode, model)
    assert "forward" in vars(model.head)
    gs.detach()
    assert "forward" not in vars(model.head)
    x, _ = seq_data()
    model(x).sum().backward()
    assert model.head.weight.grad is not None


@pytest.mark.parametrize("mode", MODES)
def test_no_recording_without_grad(mode: str) -> None:
    model = mlp()
    gs = make(mode, model)
    with torch.no_grad():
        model(torch.randn(3, 6))
    assert not gs.has_pending()


@pytest.mark.parametrize("mode", MODES)
def test_two_batches_one_after_the_other(mode: str) -> None:
    """After clipping, the next batch starts clean (no stale records)."""
    torch.manual_seed(0)
    model = TinyGPT().to(DEVICE)
    ref_model = copy.deepcopy(model)
    gs = make(mode, model)
    for seed in (0, 1):
        x, y = (t.to(DEVICE) for t in seq_data(b=3 + seed))
        ce_per_sample(model(x), y).mean().backward()
        norms = gs.per_sample_sq_norms()
        ones = {n: torch.ones_like(v) for n, v in norms.items()}
        sums = gs.clipped_sums(ones)
        ref = reference(ref_model, x, y, ce_per_sample)
        for name, g in ref.items():
            torch.testing.assert_close(sums[name], g.sum(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_registered(mode: str) -> None:
    registry = get_registry()
    assert isinstance(registry.create("grad_sampler", mode), SAMPLERS[mode])


class Scale(nn.Module):
    """A layer no sampler is registered for: the torch.func fallback serves it."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


class Mixed(nn.Module):
    """Padding index, 'same' and reflect-padded convolutions (recorded by hooks), a
    layer with no registered sampler, RMSNorm and a long embedding sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 6, padding_idx=0)
        self.same = nn.Conv1d(6, 6, 3, padding="same")
        self.reflect = nn.Conv1d(6, 6, 3, padding=1, padding_mode="reflect")
        self.scale = Scale(6)
        self.rms = nn.RMSNorm(6)
        self.out = nn.Linear(6, 7)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids).transpose(1, 2)  # [B, 6, T]
        h = torch.tanh(self.reflect(torch.tanh(self.same(h)))).transpose(1, 2)
        return self.out(self.rms(self.scale(h)))


@pytest.mark.parametrize("mode", MODES)
def test_padding_fallbacks_and_unregistered_layer(mode: str) -> None:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(7, (4, 9), generator=g)
    ids[:, :2] = 0  # padding positions get no gradient
    y = torch.randint(7, (4, 9), generator=g)
    check(mode, Mixed, ids, y, ce_per_sample)


def test_long_sequences_use_the_sampler_for_embeddings(monkeypatch: pytest.MonkeyPatch) -> None:
    from dpcore import bookkeeping

    monkeypatch.setattr(bookkeeping._EmbeddingKernel, "max_positions", 4)
    g = torch.Generator().manual_seed(6)
    ids, y = torch.randint(7, (3, 9), generator=g), torch.randint(7, (3, 9), generator=g)
    check("bk", Mixed, ids, y, ce_per_sample)


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d])
def test_bk_instantiates_small_layers_during_backward(conv: type[nn.Module]) -> None:
    """Layers whose per-sample gradients are much smaller than their activations are
    instantiated as the output gradient arrives (their tensors are let go at once)."""
    spatial = (64,) if conv is nn.Conv1d else (16, 16)
    positions = 62 if conv is nn.Conv1d else 14 * 14

    def build() -> nn.Module:
        return nn.Sequential(conv(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * positions, 3))

    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(3, 1, *spatial, generator=g), torch.randint(3, (3,), generator=g)
    check("bk", build, x, y, ce_per_sample)
    model = build()
    gs = make("bk", model)
    ce_per_sample(model(x), y).mean().backward()
    eager = {u.path: gs._eager[id(u)] for u in gs.units}
    assert eager == {"0": True, "3": False}
    assert not gs.units[0].calls and gs.units[1].calls


class ReusedConv(nn.Module):
    """A convolution applied twice (its calls cannot be merged: materialised and summed)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.conv(torch.tanh(self.conv(x)))).flatten(1))


@pytest.mark.parametrize("mode", MODES)
def test_reused_convolution(mode: str) -> None:
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(4, 3, 8, generator=g), torch.randint(2, (4,), generator=g)
    check(mode, ReusedConv, x, y, ce_per_sample)


@pytest.mark.parametrize("mode", MODES)
def test_model_called_twice_before_backward(mode: str) -> None:
    """Two forwards of the same batch and one backward: contributions add up per sample."""
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(5, 6, generator=g), torch.randint(5, (5,), generator=g)

    def twice(out: Tensor, t: Tensor) -> Tensor:
        return ce_per_sample(out, t)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def forward(self, inp: Tensor) -> Tensor:
            return self.net(inp) + self.net(inp * 0.5)

    check(mode, Twice, x, y, twice)


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch(mode: str) -> None:
    model = TinyGPT().to(DEVICE)
    gs = make(mode, model)
    ids = torch.zeros(0, 5, dtype=torch.long, device=DEVICE)
    ce_per_sample(model(ids), ids).sum().backward()
    norms = gs.per_sample_sq_norms()
    assert all(v.shape == (0,) for v in norms.values())
    sums = gs.clipped_sums({n: torch.zeros(0, device=DEVICE) for n in norms})
    assert set(sums) == set(gs.named_parameters())
    assert all(not v.any() for v in sums.values())


@pytest.mark.parametrize("mode", MODES)
def test_public_checker_accepts_fast_modes(mode: str) -> None:
    from dpcore.verify import check_per_sample_gradients

    x, y = seq_data()
    report = check_per_sample_gradients(
        TinyGPT(tied=True),
        x,
        y,
        lambda o, t: F.cross_entropy(o.flatten(0, 1), t.flatten()),
        grad_sample_mode=mode,
    )
    assert report.ok, str(report)


class _WideNarrow(nn.Module):
    """Sequence linears that widen then narrow: clip factors scale ``a`` in one and
    ``g`` in the other, and biases take their norms from the Gram or from sums."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(3, 12)
        self.down = nn.Linear(12, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(torch.tanh(self.up(x)))


def _sum_sq(out: Tensor, y: Tensor) -> Tensor:
    return (out - y).pow(2).flatten(1).sum(1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("positions", [2, 6])  # 2T² = 8 <= 36 (ghost); 72 > 36 (instantiate)
def test_narrow_and_wide_sides_with_bias(mode: str, positions: int) -> None:
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(5, positions, 3, generator=g), torch.randn(5, positions, 2, generator=g)
    check(mode, _WideNarrow, x, y, _sum_sq)
