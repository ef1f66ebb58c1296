"""Private training on 2 gloo ranks equals private training on the union of their batches.

The runs happen in the session's shared 2-rank group (``group`` in conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from dist_specs import CONFIGS
from dist_workers import DEFAULT_RUN, make_dataset, make_model, private_run
from torch import nn


def micro_batch_reference(initial, batches, spec):
    """DP-SGD by hand: per-sample gradients from micro-batches of size one, flat clipping,
    sum over the global batch, divide by the expected global batch size q*N."""
    spec = {**DEFAULT_RUN, **spec}
    data = make_dataset(spec["n"], spec["d_in"])
    model = make_model(0, spec["d_in"])
    model.load_state_dict(initial)
    expected = spec["n"] / math.ceil(spec["n"] / spec["batch_size"])  # q*N, q = 1/len(loader)
    for step in range(spec["steps"]):
        total = [torch.zeros_like(p) for p in model.parameters()]
        for i in batches[step]:
            x, y, _ = data[i]
            model.zero_grad()
            nn.functional.cross_entropy(model(x[None]), y[None]).backward()
            g = [p.grad.clone() for p in model.parameters()]
            norm = torch.sqrt(sum(t.pow(2).sum() for t in g))
            factor = min(1.0, spec["max_grad_norm"] / (float(norm) + 1e-6))
            total = [a + factor * b for a, b in zip(total, g, strict=True)]
        with torch.no_grad():
            for p, s in zip(model.parameters(), total, strict=True):
                p -= spec["lr"] * s / expected
    return model.state_dict()


def test_noiseless_distributed_update_equals_single_process_update_on_the_union(group):
    """noise 0, clipping active: 2 ranks == 1 process on the union batch, for every grad
    sampler, with gradient accumulation and with BatchMemoryManager; also == a by-hand
    micro-batch computation of DP-SGD (flat clipping)."""
    per_rank = [r["training"] for r in group]
    for config, r0, r1 in zip(CONFIGS, *per_rank, strict=True):
        label = str(config)
        assert r0["distributed"] and r0["sampler"] == "DistributedPoissonSampler", label
        spec = {**DEFAULT_RUN, **config}
        # the global expected batch q*N (q = 1/len(loader)), not a per-rank one
        assert r0["expected_batch_size"] == pytest.approx(spec["batch_size"]), label
        # DPDDP started both ranks from rank 0's parameters; they stay identical
        for key, value in r0["final"].items():
            assert torch.equal(value, r1["final"][key]), (label, key)
        # each rank drew only its shard; the union is the single-process batch
        assert all(i % 2 == 0 for b in r0["batches"].values() for i in b), label
        assert all(i % 2 == 1 for b in r1["batches"].values() for i in b), label
        single = private_run(0, 1, {**config, "ddp": False})
        union = {t: sorted(r0["batches"][t] + r1["batches"][t]) for t in r0["batches"]}
        assert union == {t: sorted(b) for t, b in single["batches"].items()}, label
        for key, value in single["final"].items():
            torch.testing.assert_close(r0["final"][key], value, atol=1e-6, rtol=1e-5, msg=label)
        assert r0["max_grad_norm"] == pytest.approx(single["max_grad_norm"]), label
        if config.get("clipping", "flat") == "flat":
            by_hand = micro_batch_reference(r0["initial"], union, config)
            for key, value in by_hand.items():
                torch.testing.assert_close(r0["final"][key], value, atol=1e-5, rtol=1e-4, msg=label)
        if config.get("empty_draws"):
            assert 0 in r0["local_sizes"] + r1["local_sizes"], "no empty local draw happened"
        # accounting: the global rate, every real step, the same epsilon on every rank
        assert r0["accounted_steps"] == r1["accounted_steps"] == DEFAULT_RUN["steps"], label
