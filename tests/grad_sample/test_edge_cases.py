"""The edge cases that make per-sample gradients silently wrong elsewhere: each gives
correct results (checked against micro-batches) or a clear error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from grad_sample._ref import microbatch_grads, sampler_grads
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import dpcore
from dpcore.errors import ConfigError, GradSampleError
from dpcore.layers import DPGRU

MATERIALISING = ["hooks", "functorch", "ew"]


def sq_loss(reduction: str = "mean"):
    def loss(out: Tensor, target: Tensor) -> Tensor:
        per_sample = (out - target).pow(2).flatten(1).sum(1)
        return per_sample.mean() if reduction == "mean" else per_sample.sum()

    return loss


def assert_grads_match(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def run_and_compare(mode, model, x, y, loss_fn, **kw) -> None:
    want = microbatch_grads(model, x, y, loss_fn, batch_first=kw.get("batch_first", True))
    got, norms, gs = sampler_grads(mode, model, x, y, loss_fn, **kw)
    assert_grads_match(got, want)
    for name, g in want.items():
        torch.testing.assert_close(norms[name], g.flatten(1).pow(2).sum(1), atol=1e-5, rtol=1e-4)
    gs.detach()


# -- batch_first=False ------------------------------------------------------------------------
class SeqFirst(nn.Module):
    """Token ids ``[T, B]`` -> embedding -> linear -> LayerNorm -> pool over T -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 2)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.norm(self.lin(self.emb(ids))).mean(0))


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_batch_first_false(mode: str) -> None:
    torch.manual_seed(0)
    ids, y = torch.randint(0, 11, (7, 3)), torch.randn(3, 2)  # T=7, B=3
    run_and_compare(mode, SeqFirst(), ids, y, sq_loss(), batch_first=False)


def test_batch_first_false_ew_refuses_with_alternative() -> None:
    gs = dpcore.get_registry().create("grad_sampler", "ew")
    with pytest.raises(GradSampleError, match="hooks"):
        gs.attach(SeqFirst(), batch_first=False)


# -- loss reduction -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MATERIALISING)
def test_mean_and_sum_give_each_sample_its_own_gradient(mode: str) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = torch.randn(5, 4), torch.randn(5, 2)
    want = microbatch_grads(model, x, y, sq_loss("mean"))
    mean, _, gs = sampler_grads(mode, model, x, y, sq_loss("mean"), loss_reduction="mean")
    gs.detach()
    summed, _, gs = sampler_grads(mode, model, x, y, sq_loss("sum"), loss_reduction="sum")
    gs.detach()
    assert_grads_match(mean, want)
    assert_grads_match(summed, want)


def test_unknown_loss_reduction_is_an_error() -> None:
    gs = dpcore.get_registry().create("grad_sampler", "hooks")
    with pytest.raises(GradSampleError, match="loss_reduction"):
        gs.attach(nn.Linear(2, 2), loss_reduction="avg")


# -- frozen parameters ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MATERIALISING)
def test_frozen_parameters_are_left_out(mode: str) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    x, y = torch.randn(4, 4), torch.randn(4, 2)
    want = microbatch_grads(model, x, y, sq_loss())
    got, _, gs = sampler_grads(mode, model, x, y, sq_loss())
    assert set(gs.named_parameters()) == {"2.weight", "4.weight", "4.bias"}
    assert_grads_match(got, want)
    if mode == "hooks":
        assert model[0] not in gs.capture.paths  # a frozen layer is not even hooked
    gs.detach()


# -- tied parameters -------------------------------------------------------------------------------
class TiedLM(nn.Module):
    """Input embedding and output projection share one matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.mix = nn.Linear(4, 4)
        self.out = nn.Linear(4, 9, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(torch.tanh(self.mix(self.emb(ids)))).mean(1)


@pytest.mark.parametrize("mode", MATERIALISING)
def test_tied_parameters_used_twice(mode: str) -> None:
    torch.manual_seed(3)
    ids, y = torch.randint(0, 9, (4, 5)), torch.randn(4, 9)
    model = TiedLM()
    assert "out.weight" not in dict(model.named_parameters())
    run_and_compare(mode, model, ids, y, sq_loss())


# -- a module reused several times per forward -------------------------------------------------------
class Reuse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)  # three calls: merged into one sequence by the Linear sampler
        self.conv = nn.Conv1d(2, 2, 3, padding=1)  # two calls: per-sample grads summed
        self.norm = nn.LayerNorm(4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(torch.tanh(self.lin(self.lin(x))))
        h = self.norm(h) + self.norm(x)
        c = self.conv(torch.relu(self.conv(h.reshape(h.shape[0], 2, 2))))
        return c.flatten(1)


@pytest.mark.parametrize("mode", MATERIALISING)
def test_module_reused_in_one_forward(mode: str) -> None:
    torch.manual_seed(4)
    x, y = torch.randn(5, 4), torch.randn(5, 4)
    run_and_compare(mode, Reuse(), x, y, sq_loss())


@pytest.mark.parametrize("mode", MATERIALISING)
def test_model_called_twice_per_step(mode: str) -> None:
    """A siamese step: two forwards of the root, one backward."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    a, b = torch.randn(4, 3), torch.randn(4, 3)

    class Siamese(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x[:, 0]) - self.net(x[:, 1])

    pair = torch.stack([a, b], dim=1)
    want = microbatch_grads(Siamese(), pair, torch.zeros(4, 2), sq_loss())
    want = {k.removeprefix("net."): v for k, v in want.items()}
    gs = dpcore.get_registry().create("grad_sampler", mode, {"store_grad_sample": True})
    gs.attach(model)
    sq_loss()(model(a) - model(b), torch.zeros(4, 2)).backward()
    gs.per_sample_sq_norms()
    assert_grads_match({n: p.grad_sample for n, p in gs.named_parameters().items()}, want)
    gs.detach()


# -- broadcast inputs ----------------------------------------------------------------------------------
class WithPositions(nn.Module):
    def __init__(self, broadcast: bool) -> None:
        super().__init__()
        self.tok = nn.Embedding(10, 4)
        self.pos = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 2)
        self.broadcast = broadcast

    def forward(self, ids: Tensor) -> Tensor:
        batch, steps = ids.shape
        positions = torch.arange(steps)
        # expanded: a [B, T] view with stride 0 over the batch; broadcast: a [1, T] tensor
        positions = positions[None] if self.broadcast else positions.expand(batch, steps)
        return self.head(self.tok(ids) + self.pos(positions)).mean(1)


@pytest.mark.parametrize("mode", MATERIALISING)
def test_expanded_position_ids(mode: str) -> None:
    torch.manual_seed(6)
    ids, y = torch.randint(0, 10, (3, 5)), torch.randn(3, 2)
    run_and_compare(mode, WithPositions(broadcast=False), ids, y, sq_loss())


def test_position_ids_broadcast_over_batch() -> None:
    """[1, T] positions: the layer sees one sample for the whole batch. hooks expands the
    shared input to the batch before the layer (as bk/ghost do), so each sample gets its
    own output gradient; functorch recomputes each sample. Both are exact."""
    torch.manual_seed(7)
    ids, y = torch.randint(0, 10, (3, 5)), torch.randn(3, 2)
    model = WithPositions(broadcast=True)
    run_and_compare("hooks", model, ids, y, sq_loss())
    run_and_compare("functorch", model, ids, y, sq_loss())


# -- empty batches ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MATERIALISING)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empty_batch(mode: str, reduction: str) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    gs = dpcore.get_registry().create("grad_sampler", mode)
    gs.attach(model, loss_reduction=reduction)
    x, y = torch.randn(0, 3), torch.randn(0, 2)
    sq_loss(reduction)(model(x), y).backward()  # mean of nothing is nan; no row carries it
    norms = gs.per_sample_sq_norms()
    sums = gs.clipped_sums({n: torch.ones(0) for n in norms})
    for name, p in gs.named_parameters().items():
        assert norms[name].shape == (0,)
        assert sums[name].shape == p.shape
        assert torch.equal(sums[name], torch.zeros_like(p))
    gs.detach()


# -- the pending batch ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MATERIALISING)
def test_two_backward_passes_before_a_flush_are_two_sets_of_samples(mode: str) -> None:
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 2))
    x1, x2 = torch.randn(2, 3), torch.randn(3, 3)
    y1, y2 = torch.randn(2, 2), torch.randn(3, 2)
    want = torch.cat(
        [
            microbatch_grads(model, x1, y1, sq_loss())["0.weight"],
            microbatch_grads(model, x2, y2, sq_loss())["0.weight"],
        ]
    )
    gs = dpcore.get_registry().create("grad_sampler", mode)
    gs.attach(model)
    sq_loss()(model(x1), y1).backward()
    with torch.no_grad():
        model(torch.randn(7, 3))  # evaluation in between records nothing
    sq_loss()(model(x2), y2).backward()
    assert gs.has_pending()
    norms = gs.per_sample_sq_norms()
    torch.testing.assert_close(norms["0.weight"], want.flatten(1).pow(2).sum(1))
    gs.clipped_sums({n: torch.ones(5) for n in norms})
    assert not gs.has_pending()
    gs.detach()


def test_forward_without_backward_is_dropped() -> None:
    model = nn.Linear(3, 2)
    gs = dpcore.get_registry().create("grad_sampler", "hooks")
    gs.attach(model)
    model(torch.randn(4, 3))  # grad enabled, but never backwarded
    x, y = torch.randn(2, 3), torch.randn(2, 2)
    sq_loss()(model(x), y).backward()
    assert gs.per_sample_sq_norms()["weight"].shape == (2,)
    gs.detach()


def test_clear_drops_pending_and_grad_sample() -> None:
    model = nn.Linear(3, 2)
    gs = dpcore.get_registry().create("grad_sampler", "hooks", {"store_grad_sample": True})
    gs.attach(model)
    sq_loss()(model(torch.randn(2, 3)), torch.randn(2, 2)).backward()
    gs.per_sample_sq_norms()
    assert model.weight.grad_sample.shape == (2, 2, 3)
    gs.clear()
    assert not gs.has_pending() and not hasattr(model.weight, "grad_sample")
    gs.detach()


@pytest.mark.parametrize("mode", MATERIALISING)
def test_grad_sample_only_when_asked(mode: str) -> None:
    model = nn.Linear(3, 2)
    gs = dpcore.get_registry().create("grad_sampler", mode)
    gs.attach(model)
    sq_loss()(model(torch.randn(2, 3)), torch.randn(2, 2)).backward()
    gs.clipped_sums({n: torch.ones(2) for n in gs.per_sample_sq_norms()})
    assert getattr(model.weight, "grad_sample", None) is None
    gs.detach()


@pytest.mark.parametrize("mode", MATERIALISING)
def test_detach_leaves_the_module_as_before(mode: str) -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    before = model(torch.ones(1, 3))
    gs = dpcore.get_registry().create("grad_sampler", mode)
    gs.attach(model)
    gs.detach()
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not model[0]._forward_hooks
    assert "forward" not in vars(model)
    torch.testing.assert_close(model(torch.ones(1, 3)), before)


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="store_grad_sample"):
        dpcore.get_registry().create("grad_sampler", "hooks", {"store_grad_samples": True})


# -- layers without a registered sampler ---------------------------------------------------------------------
class Scaled(nn.Module):
    """A custom layer with two inputs and its own parameters (no layer sampler)."""

    def __init__(self) -> None:
        super().__init__()
        self.bilinear = nn.Bilinear(3, 2, 4)  # no sampler either
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, 4))

    def forward(self, a: Tensor, b: Tensor, *, gate: Tensor | None = None) -> Tensor:
        out = self.bilinear(a, b) * self.scale
        return out if gate is None else out * gate


class UsesScaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scaled = Scaled()
        self.ct = nn.ConvTranspose1d(1, 1, 2)  # no sampler

    def forward(self, x: Tensor) -> Tensor:
        a, b = x[:, :3], x[:, 3:]
        h = self.scaled(a, b, gate=torch.sigmoid(x[:, :4]))
        return self.ct(h[:, None]).flatten(1)


def test_hooks_fall_back_to_torch_func_for_unknown_layers() -> None:
    torch.manual_seed(9)
    x, y = torch.randn(4, 5), torch.randn(4, 5)
    model = UsesScaled()
    assert dpcore.get_registry().layer_grad_sampler_for(model.scaled) is None
    run_and_compare("hooks", model, x, y, sq_loss())


def test_torch_gru_under_hooks_is_a_clear_error_naming_the_dp_layer() -> None:
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(3, 4, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.rnn(x)[0]).mean(1)

    torch.manual_seed(10)
    x, y = torch.randn(3, 5, 3), torch.randn(3, 2)
    model = Tagger()
    with pytest.raises(GradSampleError, match=r"'rnn'.*dpcore\.layers"):
        sampler_grads("hooks", model, x, y, sq_loss())
    # the fix the message names: the DP drop-in with the same weights
    model.rnn = DPGRU(3, 4, batch_first=True)
    run_and_compare("hooks", model, x, y, sq_loss())


def test_input_modified_in_place_after_forward_is_detected() -> None:
    class Shift(nn.Module):  # no sampler: recomputed by torch.func from its recorded input
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(3))

        def forward(self, x: Tensor) -> Tensor:
            return torch.tanh(x) + self.bias

    class Sneaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shift = Shift()

        def forward(self, x: Tensor) -> Tensor:
            h = x * 1.0
            out = self.shift(h)
            h.mul_(2)  # tanh saved its output, not h: autograd does not notice
            return out

    with pytest.raises(GradSampleError, match="modified in place"):
        sampler_grads("hooks", Sneaky(), torch.randn(2, 3), torch.randn(2, 3), sq_loss())


def test_autocast_bfloat16_norms_are_float32() -> None:
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    gs = dpcore.get_registry().create("grad_sampler", "hooks")
    gs.attach(model)
    x, y = torch.randn(3, 4), torch.randn(3, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    sq_loss()(out.float(), y).backward()
    norms = gs.per_sample_sq_norms()
    want = microbatch_grads(model, x, y, sq_loss())
    for name, g in want.items():
        assert norms[name].dtype == torch.float32
        torch.testing.assert_close(norms[name], g.flatten(1).pow(2).sum(1), rtol=0.05, atol=1e-2)
    gs.detach()


def test_functional_reuse_of_a_parameter_outside_its_layer() -> None:
    """The root uses a child's weight directly (F.linear): functorch handles any use."""

    class Direct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            return F.linear(self.lin(x), self.lin.weight)

    torch.manual_seed(12)
    run_and_compare("functorch", Direct(), torch.randn(4, 3), torch.randn(4, 3), sq_loss())


def test_hooks_refuse_a_parameter_used_outside_its_layer() -> None:
    """hooks cannot see `F.linear(..., self.lin.weight)` in the parent: the sum check says so
    instead of returning per-sample gradients that miss that use."""

    class Direct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            return F.linear(self.lin(x), self.lin.weight)

    with pytest.raises(GradSampleError, match=r"lin\.weight.*outside the layer"):
        sampler_grads("hooks", Direct(), torch.randn(4, 3), torch.randn(4, 3), sq_loss())


def test_hooks_refuse_a_loss_term_without_per_sample_form() -> None:
    model = nn.Linear(3, 2)
    gs = dpcore.get_registry().create("grad_sampler", "hooks")
    gs.attach(model)
    loss = sq_loss()(model(torch.randn(4, 3)), torch.randn(4, 2)) + model.weight.pow(2).sum()
    loss.backward()
    with pytest.raises(GradSampleError, match="weight_decay"):
        gs.per_sample_sq_norms()
    assert not gs.has_pending()
    gs.detach()


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def segment(self, h: Tensor) -> Tensor:
        return torch.tanh(self.b(torch.tanh(h)))

    def forward(self, x: Tensor) -> Tensor:
        h = checkpoint(self.segment, self.a(x), use_reentrant=False)
        return self.c(h)


def test_activation_checkpointing() -> None:
    """The recomputed segment belongs to the batch being backwarded: hooks is exact; ew,
    which expanded weights get wrong here, refuses."""
    torch.manual_seed(13)
    model = Checkpointed()
    x, y = torch.randn(3, 4), torch.randn(3, 2)
    run_and_compare("hooks", model, x, y, sq_loss())
    with pytest.raises(GradSampleError, match="checkpointing"):
        sampler_grads("ew", model, x, y, sq_loss())


def test_autocast_bfloat16_with_normalisation_layers() -> None:
    """Autocast runs the norms in float32; their samplers recompute x̂ likewise, so the
    near-cancelling scale gradients survive (and hooks' sum check passes)."""
    torch.manual_seed(14)
    model = nn.Sequential(
        nn.Conv1d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.InstanceNorm1d(4, affine=True),
        nn.Flatten(), nn.LayerNorm(24), nn.Linear(24, 2),
    )  # fmt: skip
    x, y = torch.randn(3, 3, 6), torch.randn(3, 2)
    want = microbatch_grads(model, x, y, sq_loss())
    gs = dpcore.get_registry().create("grad_sampler", "hooks")
    gs.attach(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    sq_loss()(out.float(), y).backward()
    norms = gs.per_sample_sq_norms()
    # bf16 noise is relative to the whole gradient (a nearly cancelling bias gradient is
    # pure noise in bf16, for autograd too): compare at the scale of the total norm
    total = sum(float(g.norm()) ** 2 for g in want.values()) ** 0.5
    for name, g in want.items():
        assert norms[name].dtype == torch.float32
        torch.testing.assert_close(
            norms[name].sqrt(), g.flatten(1).norm(dim=1), atol=0.01 * total, rtol=0.05
        )
    gs.detach()


class MaskedLinear(nn.Linear):
    """A subclass that changes the computation: the Linear formulas would be wrong."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * torch.tensor([[1.0, 0.0, 2.0]]), self.bias)


class PlainSubclass(nn.Linear):
    """A subclass that only adds a method keeps the Linear sampler."""

    def describe(self) -> str:
        return "plain"


def test_subclass_overriding_forward_does_not_inherit_the_base_sampler() -> None:
    from dpcore.builtins.layer_samplers import LinearGradSampler
    from dpcore.capture import exact_layer_sampler

    registry = dpcore.get_registry()
    assert exact_layer_sampler(registry, MaskedLinear(3, 2)) is None
    assert isinstance(exact_layer_sampler(registry, PlainSubclass(3, 2)), LinearGradSampler)
    torch.manual_seed(15)
    model = nn.Sequential(MaskedLinear(3, 2), nn.Tanh(), PlainSubclass(2, 2))
    run_and_compare("hooks", model, torch.randn(4, 3), torch.randn(4, 2), sq_loss())
