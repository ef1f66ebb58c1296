"""CUDA-graph replay of the private step (dpcore.graphs): bit-identical to eager steps,
and every way out of it (unsafe reads, failed captures, changing shapes) falls back to
the eager result. The restore logic also runs on the CPU."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpcore
from dpcore.builtins.clippers.flat import FlatClipper

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 16, seq: int = 6) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)[None]  # broadcast over the batch
        x = self.tok(ids) + self.pos(pos)
        return self.out(torch.relu(self.fc(self.ln(x))))


def _conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 4)
    )


def _batches(kind: str, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """CPU batches: each goes to the device in the loop, as from a data loader."""
    g = torch.Generator().manual_seed(1)
    out = []
    for b in sizes:
        if kind == "lm":
            ids = torch.randint(0, 50, (b, 7), generator=g)
            out.append((ids[:, :-1], ids[:, 1:]))
        else:
            x = torch.randn(b, 1, 8, 8, generator=g)
            out.append((x, torch.randint(0, 4, (b,), generator=g)))
    return out


def _train(
    kind: str,
    graphs: bool,
    sizes: list[int],
    *,
    device: str = "cuda",
    clipping: str = "flat",
    dtype: torch.dtype | None = None,
    clipper: object = None,
    before_step: object = None,
) -> tuple[nn.Module, dpcore.DPOptimizer]:
    torch.manual_seed(0)
    model = (TinyLM() if kind == "lm" else _conv()).to(device)
    engine = dpcore.PrivacyEngine(accountant="rdp")
    model, opt, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
        data_loader=DataLoader(TensorDataset(torch.arange(64)), batch_size=8),
        noise_multiplier=0.7,
        max_grad_norm=0.5,
        grad_sample_mode="bk",
        clipping=clipping,
        seed=3,
        wrap_model=False,
    )
    if clipper is not None:
        opt.clipper = clipper
    opt.cuda_graphs = graphs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stepping without the private loader's batches
        for i, (x_cpu, y_cpu) in enumerate(_batches(kind, sizes)):
            if before_step is not None:
                before_step(opt, i)
            x, y = x_cpu.to(device), y_cpu.to(device)
            opt.zero_grad()
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                out = model(x)
            nn.functional.cross_entropy(out.flatten(0, -2).float(), y.flatten()).backward()
            opt.step()
    return model, opt


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["lm", "conv"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_replayed_steps_are_bit_identical_to_eager(kind, dtype):
    eager, opt_e = _train(kind, False, [8] * 16, dtype=dtype)
    graphed, opt_g = _train(kind, True, [8] * 16, dtype=dtype)
    assert opt_e._graph.replays == 0
    graph = opt_g._graph
    assert graph.disabled is None, graph.disabled
    # replays beyond the captures' own first replay: the allocator settles quickly
    assert graph.replays - graph.captures >= 5, (graph.replays, graph.captures)
    _assert_same(eager, graphed)


@cuda
@pytest.mark.gpu
def test_changing_batch_sizes_run_eagerly_and_stay_identical():
    sizes = [8, 5, 8, 8, 3, 3, 3, 8, 6, 8, 8]
    eager, _ = _train("lm", False, sizes)
    graphed, opt = _train("lm", True, sizes)
    _assert_same(eager, graphed)
    assert opt._graph.captures >= 1, opt._graph.disabled


@cuda
@pytest.mark.gpu
def test_sizes_that_always_change_turn_graphs_off():
    sizes = [8, 5, 7, 4, 8, 6, 3, 8, 5, 7, 4, 6]
    eager, _ = _train("lm", False, sizes)
    graphed, opt = _train("lm", True, sizes)
    assert opt._graph.disabled is not None and opt._graph.disabled.startswith("shapes changed")
    assert opt._graph.captures == 0
    _assert_same(eager, graphed)


@cuda
@pytest.mark.gpu
def test_a_new_noise_scale_is_never_replayed_from_an_old_graph():
    """σ·C is baked into a capture: changing σ mid-run must capture anew, not replay."""

    def schedule(opt, i):
        opt.noise_multiplier = 0.7 if i < 6 else 3.0

    eager, _ = _train("conv", False, [8] * 12, before_step=schedule)
    graphed, opt = _train("conv", True, [8] * 12, before_step=schedule)
    assert opt._graph.disabled is None and opt._graph.captures >= 2
    _assert_same(eager, graphed)


@cuda
@pytest.mark.gpu
def test_plugins_that_are_not_graph_safe_never_replay():
    eager, _ = _train("conv", False, [8] * 4, clipping="per_layer")
    graphed, opt = _train("conv", True, [8] * 4, clipping="per_layer")
    assert opt._graph.replays == 0 and opt._graph.captures == 0
    _assert_same(eager, graphed)


class _CachedBoundClipper(FlatClipper):
    """Claims to be graph safe but reads a tensor it keeps: the capture must be refused."""

    def __init__(self) -> None:
        super().__init__(max_grad_norm=0.5, parameter_names=[])
        self.bound = torch.tensor(0.5, device="cuda")

    def clip_factors(self, sq_norms):
        total = torch.stack(list(sq_norms.values())).sum(0).sqrt()
        factor = (self.bound / (total + 1e-6)).clamp(max=1.0)
        return {name: factor for name in sq_norms}


class _SyncingClipper(FlatClipper):
    """Claims to be graph safe but synchronises with the host: the capture fails."""

    def __init__(self) -> None:
        super().__init__(max_grad_norm=0.5, parameter_names=[])

    def clip_factors(self, sq_norms):
        factors = super().clip_factors(sq_norms)
        if float(next(iter(factors.values())).max()) > 2.0:  # a host sync
            raise AssertionError("unreachable")
        return factors


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize(
    "clipper,reason", [(_CachedBoundClipper, "unsafe capture"), (_SyncingClipper, "capture failed")]
)
def test_discarded_captures_fall_back_to_the_eager_result(clipper, reason):
    eager, _ = _train("lm", False, [8] * 5, clipper=clipper())
    graphed, opt = _train("lm", True, [8] * 5, clipper=clipper())
    assert opt._graph.disabled is not None and opt._graph.disabled.startswith(reason)
    assert opt._graph.replays == 0
    _assert_same(eager, graphed)
    torch.randn(3, device="cuda")  # the default generator still draws eagerly


def test_restore_undoes_a_partial_flush_on_cpu():
    """What a discarded capture may have done to the grad sampler is undone exactly."""
    torch.manual_seed(0)
    model = TinyLM()
    gs = dpcore.get_registry().create("grad_sampler", "bk")
    gs.attach(model)
    ids = torch.randint(0, 50, (4, 6))
    nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    clipper = FlatClipper(max_grad_norm=0.1, parameter_names=list(gs.named_parameters()))
    tensors, batch, restore = gs.graph_inputs()
    assert batch == 4 and all(isinstance(t, torch.Tensor) for t in tensors)
    first = gs.clipped_sums(clipper.clip_factors(gs.per_sample_sq_norms()))  # clears
    assert not gs.has_pending()
    restore()
    assert gs.has_pending()
    again = gs.clipped_sums(clipper.clip_factors(gs.per_sample_sq_norms()))
    assert first.keys() == again.keys()
    for name in first:
        assert torch.equal(first[name], again[name]), name


class _BufferBoundClipper(FlatClipper):
    """Reads its bound from a buffer of the model: a read the graph key must follow."""

    def __init__(self) -> None:
        super().__init__(max_grad_norm=0.5, parameter_names=[])
        self.model: nn.Module | None = None

    def clip_factors(self, sq_norms):
        total = torch.stack(list(sq_norms.values())).sum(0).sqrt()
        factor = (self.model.bound / (total + 1e-6)).clamp(max=1.0)
        return {name: factor for name in sq_norms}


@cuda
@pytest.mark.gpu
def test_a_model_tensor_the_graph_reads_is_followed_when_it_moves():
    """A capture that reads a model buffer replays only while that buffer stays where it
    was: moving it (``.data =``, the old storage kept alive and unchanged) captures anew."""
    kept = []

    def schedule(opt, i):
        model = opt._module
        if i == 0:
            model.register_buffer("bound", torch.tensor(0.5, device="cuda"))
            opt.clipper.model = model
            # the allocator may take a few captures to settle: this test is about the key
            opt._graph.max_misses = 64
        if i == 8:
            kept.append(model.bound.data)
            model.bound.data = torch.tensor(0.05, device="cuda")
        if i == 14:
            model.bound.fill_(0.3)  # in place: same address, the replay reads the new value

    eager, _ = _train("lm", False, [8] * 20, clipper=_BufferBoundClipper(), before_step=schedule)
    graphed, opt = _train("lm", True, [8] * 20, clipper=_BufferBoundClipper(), before_step=schedule)
    graph = opt._graph
    assert graph.disabled is None, graph.disabled
    assert graph.captures >= 2 and graph.replays - graph.captures >= 3, (
        graph.captures,
        graph.replays,
    )
    assert graph._reads is not None and len(graph._reads[1]) == 1  # the buffer, nothing else
    _assert_same(eager, graphed)
