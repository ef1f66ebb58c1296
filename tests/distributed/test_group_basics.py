"""DPDDP, the distributed helpers and the errors, in one spawned 2-rank gloo group
(and in the test process, with no group or a group of one)."""

from __future__ import annotations

import pytest
import torch
from dist_workers import tiny_model

import dpcore
from dpcore import distributed as D
from dpcore.errors import DistributedError
from dpcore.rng import make_generator


@pytest.fixture(scope="module")
def ranks(group):
    return group


def test_dpddp_broadcasts_rank0_at_construction_and_nothing_in_backward(ranks):
    r0, r1 = (r["wrapper"] for r in ranks)
    assert (r0["rank"], r1["rank"], r0["world_size"], r0["is_distributed"]) == (0, 1, 2, True)
    # ranks started different ...
    assert not torch.equal(r0["before"]["0.weight"], r1["before"]["0.weight"])
    # ... and after wrapping every rank has rank 0's parameters and buffers, no prefix
    assert set(r0["after"]) == {"0.weight", "0.bias", "2.weight", "2.bias", "counter"}
    for key, value in r0["after"].items():
        assert torch.equal(value, r0["before"][key])
        assert torch.equal(r1["after"][key], value)
    # backward did not synchronise: different inputs give different local gradients
    assert not torch.equal(r0["grads"]["0.weight"], r1["grads"]["0.weight"])


def test_config_check_passes_when_equal_and_names_the_difference(ranks):
    assert [r["config_equal"] for r in ranks] == ["ok", "ok"]
    for r in ranks:
        assert "noise_multiplier: 1.0 vs 0.5" in r["config_differ"]
        assert "rank 1 vs rank 0" in r["config_differ"]


def test_make_private_refuses_ranks_with_different_configs(ranks):
    for r in ranks:
        message = r["make_private_mismatch"]
        assert "differs between ranks" in message and "noise_multiplier: 1.0 vs 1.1" in message


def test_forgotten_dpddp_and_a_distributed_sampler_are_warned_about(ranks):
    for r in ranks:
        plain, with_sampler = r["warnings"]["no_dpddp"], r["warnings"]["distributed_sampler"]
        # without DPDDP: no collective, each rank a separate single-process run
        assert not plain["distributed"] and plain["sampler"] == "PoissonSampler"
        assert any("not a dpcore.DPDDP" in w for w in plain["warnings"])
        # DistributedSampler ignored; the rate is 1/len(loader) = 1/4 with 2 ranks x 5
        assert (
            with_sampler["distributed"] and with_sampler["sampler"] == "DistributedPoissonSampler"
        )
        assert any("DistributedSampler" in w for w in with_sampler["warnings"])
        assert with_sampler["sample_rate"] == pytest.approx(0.25)


def test_flattened_all_reduce_and_broadcast_object(ranks):
    for r in (r["collectives"] for r in ranks):
        assert torch.equal(r["tensors"]["a"], torch.full((2, 3), 3.0))
        assert torch.equal(r["tensors"]["b"], torch.arange(4, dtype=torch.float64) * 3)
        assert r["tensors"]["b"].dtype == torch.float64
        assert torch.equal(r["tensors"]["c"], torch.tensor([3]))
        assert r["seed"] == 1000


def test_plain_ddp_is_refused_with_the_fix(ranks):
    """By DPDDP and by make_private: its backward all-reduces unclipped gradients."""
    for r in ranks:
        for message in r["plain_ddp"].split(" || "):
            assert "dpcore.DPDDP" in message and "DistributedDataParallel" in message


def test_sampler_ranks_share_rank0_stream(ranks):
    """Built as the engine does (a different generator per rank), the ranks still draw
    from rank 0's stream, so rank 0's state restores both."""
    r0, r1 = (r["sampler"] for r in ranks)
    assert torch.equal(r0["state"]["generator"], r1["state"]["generator"])
    reference = dpcore.get_registry().create(
        "sampler",
        "distributed_poisson",
        {"steps_per_epoch": 6},
        num_samples=40,
        sample_rate=0.3,
        generator=make_generator(7, "sampler", 0),
    )
    union = [sorted(a + b) for a, b in zip(r0["batches"], r1["batches"], strict=True)]
    assert union == list(reference)
    assert all(i % 2 == 1 for b in r1["batches"] for i in b)


# -- no process group / a group of one, in this process --------------------------------
def test_uninitialised_backend_is_a_clear_error():
    assert not D.is_distributed()
    assert (D.rank(), D.world_size()) == (0, 1)
    with pytest.raises(DistributedError, match="init_process_group"):
        dpcore.DPDDP(tiny_model(0))
    from dpcore.optimizer import DPOptimizer

    with pytest.raises(DistributedError, match="torchrun"):
        DPOptimizer(torch.optim.SGD(tiny_model(0).parameters(), lr=0.1), grad_sampler=None,
                    clipper=None, noise=None, noise_multiplier=1.0, expected_batch_size=4.0,
                    distributed=True)  # fmt: skip


def test_wrapper_behaves_like_the_model(single_rank_group):
    model = tiny_model(0)
    model.greeting = "hello"
    wrapped = dpcore.DPDDP(model)
    assert wrapped.greeting == "hello"
    assert wrapped.module is model
    assert list(dict(wrapped.named_parameters())) == list(dict(model.named_parameters()))
    assert list(wrapped.state_dict()) == list(model.state_dict())
    # a plain state dict loads into the wrapper, and a wrapper's into a plain model
    other = tiny_model(1)
    wrapped.load_state_dict(other.state_dict())
    assert torch.equal(model[0].weight, other[0].weight)
    fresh = tiny_model(2)
    fresh.load_state_dict(wrapped.state_dict())
    assert torch.equal(fresh[2].bias, model[2].bias)
    # nested in a parent module, the wrapper adds no "module." segment either way
    parent = torch.nn.ModuleDict({"net": wrapped})
    keys = list(parent.state_dict())
    assert keys == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    parent.load_state_dict({k: torch.zeros_like(v) for k, v in parent.state_dict().items()})
    assert model[0].weight.abs().sum() == 0
    x = torch.randn(3, 4)
    assert torch.equal(wrapped(x), model(x))


def test_process_group_from_env_is_a_no_op_without_a_launcher(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with D.process_group_from_env() as distributed:
        assert distributed is False and not D.is_distributed()
    # and the single-process helpers need no group
    D.check_same_config({"anything": 1})
    assert D.broadcast_object(42) == 42
    values = {"g": torch.ones(3)}
    D.all_reduce_sum_(values)
    assert torch.equal(values["g"], torch.ones(3))


def test_process_group_from_env_joins_and_leaves_torchrun_s_group(monkeypatch):
    from dist_harness import free_port

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with D.process_group_from_env("gloo") as distributed:
        assert distributed and D.world_size() == 1 and D.rank() == 0
    assert not D.is_distributed()
