"""Noise is added once per step (not once per rank), and a killed distributed run resumes
to the state of an uninterrupted one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dist_harness import run_ranks
from dist_specs import BANDMF_SPEC, BATCH, CLIP, NOISE_RUNS, NOISE_SPEC, RESUME_SPEC, SIGMA
from dist_workers import private_run
from scipy import stats
from torch.multiprocessing import ProcessExitedException

from dpcore.errors import DistributedError


@pytest.fixture(scope="module")
def runs(group):
    """name -> (rank 0's result, rank 1's) of the noisy runs of the shared group."""
    return {name: (group[0]["noise"][name], group[1]["noise"][name]) for name in NOISE_RUNS}


def single_addition_pvalue(grads: torch.Tensor) -> float:
    """Two-sided p-value of 'each coordinate is N(0, s^2)' with s the std of ONE addition
    at the global scale: s = sigma * C / (q N), q N = the global expected batch."""
    s = SIGMA * CLIP / BATCH
    statistic = float((grads.double() / s).pow(2).sum())
    n = grads.numel()
    return 2 * min(stats.chi2.sf(statistic, n), stats.chi2.cdf(statistic, n))


def test_noise_is_added_once_at_the_global_scale(runs):
    r0, r1 = runs["noise"]
    grads = torch.stack(r0["grads"])
    assert all(torch.equal(a, b) for a, b in zip(r0["grads"], r1["grads"], strict=True))
    assert grads.numel() > 6000
    # variance: one addition of N(0, (sigma C)^2) to the global sum, divided by q N
    assert single_addition_pvalue(grads) > 1e-3
    assert stats.kstest((grads / (SIGMA * CLIP / BATCH)).flatten().numpy(), "norm").pvalue > 1e-3
    # exactly the draw a single process makes with the same seed: rank 0's stream, once
    single = private_run(0, 1, {**NOISE_SPEC, "ddp": False})
    assert all(torch.equal(a, b) for a, b in zip(r0["grads"], single["grads"], strict=True))


def test_correlated_noise_is_added_once_too(runs):
    r0, r1 = runs["bandmf"]
    single = private_run(0, 1, {**BANDMF_SPEC, "ddp": False})
    assert r0["sampler"] == "CyclicPoissonSampler"
    for a, b, c in zip(r0["grads"], r1["grads"], single["grads"], strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert r0["epsilon"] == pytest.approx(single["epsilon"], rel=1e-9)


@pytest.mark.parametrize("how", ["same", "independent"])
def test_the_variance_test_rejects_noise_added_on_every_rank(runs, how):
    r0, r1 = runs[how]
    grads = torch.stack(r0["grads"])
    assert all(torch.equal(a, b) for a, b in zip(r0["grads"], r1["grads"], strict=True))
    assert single_addition_pvalue(grads) < 1e-9
    # the measured variance is what per-rank addition predicts: 2x (independent), 4x (same)
    ratio = float(grads.double().pow(2).mean()) / (SIGMA * CLIP / BATCH) ** 2
    assert ratio == pytest.approx(4.0 if how == "same" else 2.0, rel=0.1)


def test_epsilon_and_steps_agree_on_all_ranks(runs):
    r0, r1 = runs["straight"]
    assert r0["epsilon"] == r1["epsilon"] and math.isfinite(r0["epsilon"])
    assert r0["accounted_steps"] == r1["accounted_steps"] == RESUME_SPEC["steps"]
    # adaptive clipping: the bound moved, identically on both ranks (count summed, one noise)
    assert r0["max_grad_norm"] == r1["max_grad_norm"] != RESUME_SPEC["max_grad_norm"]
    single = private_run(0, 1, {**RESUME_SPEC, "ddp": False})
    assert r0["epsilon"] == pytest.approx(single["epsilon"])


@pytest.fixture(scope="module")
def killed_run_checkpoint(tmp_path_factory):
    """A 2-rank run SIGKILLed right after its checkpoint at step 3 (of 7)."""
    ckpt = str(tmp_path_factory.mktemp("killed") / "run.pt")
    with pytest.raises(ProcessExitedException):
        run_ranks(private_run, 2, {**RESUME_SPEC, "save_at": 3, "ckpt": ckpt, "kill": True})
    return ckpt


def test_killed_distributed_run_resumes_to_the_uninterrupted_state(runs, killed_run_checkpoint):
    r0, r1 = run_ranks(private_run, 2, {**RESUME_SPEC, "resume": killed_run_checkpoint})
    straight, _ = runs["straight"]
    for key, value in straight["final"].items():
        assert torch.equal(r0["final"][key], value), key
        assert torch.equal(r1["final"][key], value), key
    assert r0["epsilon"] == r1["epsilon"] == straight["epsilon"]
    assert r0["max_grad_norm"] == straight["max_grad_norm"]
    assert np.allclose(r0["grads"][-1], straight["grads"][-1], atol=0)


@pytest.mark.parametrize("ddp", [True, False], ids=["dpddp-1-rank", "one-process"])
def test_resuming_on_another_world_size_reshards_exactly(
    runs, killed_run_checkpoint, single_rank_group, ddp
):
    """The 2-rank checkpoint resumed on 1 rank (DPDDP) or in a plain process: the same
    global batches, noise and clipping, so the same final state (up to float summation
    order)."""
    resumed = private_run(0, 1, {**RESUME_SPEC, "resume": killed_run_checkpoint, "ddp": ddp})
    s0, s1 = runs["straight"]
    for step, batch in resumed["batches"].items():
        assert sorted(batch) == sorted(s0["batches"][step] + s1["batches"][step]), step
    assert sorted(resumed["batches"]) == list(range(3, RESUME_SPEC["steps"]))
    for key, value in s0["final"].items():
        torch.testing.assert_close(resumed["final"][key], value, atol=1e-6, rtol=1e-5)
    assert resumed["epsilon"] == pytest.approx(s0["epsilon"])


def test_a_sampler_that_cannot_reshard_refuses_another_world_size(
    killed_run_checkpoint, monkeypatch
):
    from dpcore.builtins.samplers.poisson import PoissonSampler

    original = PoissonSampler.__init__

    def not_reshardable(self, **kwargs):
        original(self, **kwargs)
        self.world_size_independent = False

    monkeypatch.setattr(PoissonSampler, "__init__", not_reshardable)
    with pytest.raises(DistributedError, match=r"written by a run on 2 rank\(s\), this run has 1"):
        private_run(0, 1, {**RESUME_SPEC, "resume": killed_run_checkpoint, "ddp": False})
