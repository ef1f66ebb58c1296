"""DPDDP and the distributed helpers, on 2 gloo processes (and without a process group)."""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_ranks
from dist_workers import (
    all_reduce_and_broadcast,
    config_check,
    plain_ddp_refused,
    tiny_model,
    wrapper_basics,
)

import dpcore
from dpcore import distributed as D
from dpcore.errors import DistributedError


def test_dpddp_broadcasts_rank0_at_construction_and_nothing_in_backward():
    r0, r1 = run_ranks(wrapper_basics, 2)
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


def test_config_check_passes_when_equal_and_names_the_difference():
    assert run_ranks(config_check, 2, False) == ["ok", "ok"]
    errors = run_ranks(config_check, 2, True)
    for message in errors:
        assert "noise_multiplier: 1.0 vs 0.5" in message
        assert "rank 1 vs rank 0" in message


def test_flattened_all_reduce_and_broadcast_object():
    r0, r1 = run_ranks(all_reduce_and_broadcast, 2)
    for r in (r0, r1):
        assert torch.equal(r["tensors"]["a"], torch.full((2, 3), 3.0))
        assert torch.equal(r["tensors"]["b"], torch.arange(4, dtype=torch.float64) * 3)
        assert r["tensors"]["b"].dtype == torch.float64
        assert torch.equal(r["tensors"]["c"], torch.tensor([3]))
        assert r["seed"] == 1000


def test_plain_ddp_is_refused_with_the_fix():
    messages = run_ranks(plain_ddp_refused, 2)
    assert all("dpcore.DPDDP" in m and "DistributedDataParallel" in m for m in messages)


def test_uninitialised_backend_is_a_clear_error():
    assert not D.is_distributed()
    assert (D.rank(), D.world_size()) == (0, 1)
    with pytest.raises(DistributedError, match="init_process_group"):
        dpcore.DPDDP(tiny_model(0))


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
