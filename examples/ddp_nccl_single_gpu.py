"""Private DDP over NCCL: dpcore's distributed path end to end, checked.

    python examples/ddp_nccl_single_gpu.py                 # one GPU: a 1-process group
    torchrun --nproc-per-node 1 examples/ddp_nccl_single_gpu.py
    torchrun --nproc-per-node N examples/ddp_nccl_single_gpu.py   # N GPUs, same checks

On one GPU the NCCL collectives are identities, but the code that runs is the
multi-GPU one (DPDDP, the distributed DP optimizer step with its all-reduce, the
shared sampler stream, the config check, NCCL staging of CPU tensors). Checks:

1. noise 0, clipping active: one step of a DPDDP model equals DP-SGD computed by hand
   from per-sample gradients of micro-batches of size one on the union of the ranks'
   batches, for each grad sampler;
2. noise on, zero gradients: the update is one noise addition at the global scale
   (chi-square test of its variance), bit for bit the draw of a run without DPDDP
   (noise added once, on rank 0, not once per rank);
3. adaptive clipping (its count goes through NCCL from a CPU tensor) with a checkpoint:
   3 steps, save (rank 0), a fresh engine/model/optimizer loads it, 3 more steps == 6
   straight.

Rank 0 prints one line starting with PASS, or a rank raises. Without a GPU it prints
a SKIP line and exits 0.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpcore
from dpcore.distributed import broadcast_object, process_group_from_env

N, D_IN, HIDDEN, CLASSES, BATCH = 512, 32, 64, 4, 64  # q = 1/8, expected global batch 64


def dataset(d_in: int = D_IN) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(N, d_in, generator=g), torch.randint(0, CLASSES, (N,), generator=g)
    )


def model(device: torch.device, d_in: int = D_IN, hidden: int = HIDDEN) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, CLASSES)).to(device)


def private(net: nn.Module, *, ddp: bool = True, data: TensorDataset | None = None, **kw):
    engine = dpcore.PrivacyEngine(accountant="rdp")
    module = dpcore.DPDDP(net) if ddp else net
    kw.setdefault("seed", 0)
    out = engine.make_private(
        module=module,
        optimizer=torch.optim.SGD(net.parameters(), lr=kw.pop("lr", 0.5)),
        data_loader=DataLoader(data or dataset(), batch_size=BATCH),
        **kw,
    )
    return engine, *out


def check_noiseless_step_equals_by_hand(device: torch.device) -> float:
    modes = [
        m for m in ("hooks", "ghost", "bk") if m in dpcore.get_registry().names("grad_sampler")
    ]
    worst = 0.0
    clip, lr = 0.5, 0.5
    for mode in modes:
        net = model(device)
        reference = copy.deepcopy(net)
        engine, wrapped, optimizer, loader = private(
            net, noise_multiplier=0.0, max_grad_norm=clip, grad_sample_mode=mode, lr=lr
        )
        assert optimizer.distributed, "a DPDDP model must get the distributed DP optimizer"
        x, y = next(iter(loader))  # this rank's part of the global batch
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        nn.functional.cross_entropy(wrapped(x), y).backward()
        optimizer.step()
        # by hand on the union of the ranks' batches: per-sample gradients, flat
        # clipping, sum, / expected global batch, SGD
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (x.cpu(), y.cpu()))
        x = torch.cat([part[0] for part in parts]).to(device)
        y = torch.cat([part[1] for part in parts]).to(device)
        total = [torch.zeros_like(p) for p in reference.parameters()]
        for i in range(len(x)):
            reference.zero_grad()
            nn.functional.cross_entropy(reference(x[i : i + 1]), y[i : i + 1]).backward()
            grads = [p.grad for p in reference.parameters()]
            norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
            factor = min(1.0, clip / (norm + 1e-6))
            total = [t + factor * g for t, g in zip(total, grads, strict=True)]
        with torch.no_grad():
            for p, t in zip(reference.parameters(), total, strict=True):
                p -= lr * t / BATCH
        for (name, a), b in zip(net.named_parameters(), reference.parameters(), strict=True):
            diff = float((a - b).detach().abs().max())
            worst = max(worst, diff)
            assert diff < 1e-5, f"{mode}: {name} differs from the by-hand step by {diff}"
        engine.detach()
    return worst


def check_noise_once(device: torch.device) -> float:
    sigma, clip, d_in, hidden = 1.3, 0.7, 256, 256

    def noise_of(ddp: bool) -> torch.Tensor:
        net = model(device, d_in, hidden)
        _, wrapped, optimizer, loader = private(
            net, ddp=ddp, data=dataset(d_in), noise_multiplier=sigma, max_grad_norm=clip, lr=0.0
        )
        x, y = next(iter(loader))
        optimizer.zero_grad()
        (nn.functional.cross_entropy(wrapped(x.to(device)), y.to(device)) * 0.0).backward()
        optimizer.step()
        return torch.cat([p.grad.reshape(-1) for p in net.parameters()])

    distributed = noise_of(True)
    with warnings.catch_warnings():  # several ranks, no DPDDP: each its own run (warned)
        warnings.simplefilter("ignore")
        plain = noise_of(False)
    assert torch.equal(distributed, plain), "the NCCL step's noise is not the single-process draw"
    scale = sigma * clip / BATCH  # one addition of N(0, (σC)²) to the sum, / q N
    statistic = float((distributed.double() / scale).pow(2).sum())
    n = distributed.numel()
    p_value = 2 * min(stats.chi2.sf(statistic, n), stats.chi2.cdf(statistic, n))
    assert p_value > 1e-4, f"noise variance off: ratio {statistic / n:.4f}, p = {p_value:.2e}"
    return p_value


def check_adaptive_checkpoint_resume(device: torch.device, workdir: Path) -> float:
    spec = {
        "noise_multiplier": 0.8,
        "max_grad_norm": 0.3,
        "clipping": "adaptive",
        "grad_sample_mode": "bk",
    }
    if "bk" not in dpcore.get_registry().names("grad_sampler"):
        spec["grad_sample_mode"] = "hooks"
    ckpt = workdir / "ckpt.pt"

    def run(steps: int, save_at: int | None = None, resume: bool = False) -> nn.Module:
        net = model(device)
        engine, wrapped, optimizer, loader = private(net, **spec)
        if resume:
            engine.load_checkpoint(
                path=ckpt, module=wrapped, optimizer=optimizer, data_loader=loader
            )
        while engine.steps < steps:
            for x, y in loader:
                optimizer.zero_grad()
                nn.functional.cross_entropy(wrapped(x.to(device)), y.to(device)).backward()
                optimizer.step()
                if engine.steps == save_at:
                    engine.save_checkpoint(
                        path=ckpt, module=wrapped, optimizer=optimizer, data_loader=loader
                    )
                    dist.barrier()  # rank 0 has written it before anyone reads it
                    return net
                if engine.steps >= steps:
                    break
        return net

    straight = run(6)
    run(6, save_at=3)
    resumed = run(6, resume=True)
    diff = max(
        float((a - b).detach().abs().max())
        for a, b in zip(straight.parameters(), resumed.parameters(), strict=True)
    )
    assert diff < 1e-6, f"resumed run differs from the straight run by {diff}"
    return diff


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    if not torch.cuda.is_available():
        print("SKIP ddp_nccl_single_gpu: no CUDA device")
        return 0
    if "RANK" not in os.environ:  # not under torchrun: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))  # fmt: skip
    with process_group_from_env("nccl"):
        assert dist.get_backend() == "nccl"
        rank = dist.get_rank()
        device = torch.device("cuda", torch.cuda.current_device())
        tmp = broadcast_object(tempfile.mkdtemp() if rank == 0 else None)  # one host
        worst_step = check_noiseless_step_equals_by_hand(device)
        p_value = check_noise_once(device)
        resume_diff = check_adaptive_checkpoint_resume(device, Path(tmp))
        dist.barrier()
        if rank != 0:
            return 0
        shutil.rmtree(tmp, ignore_errors=True)
        print(
            f"PASS ddp_nccl_single_gpu: backend=nccl world_size={dist.get_world_size()} "
            f"device={torch.cuda.get_device_name(device)} | noiseless step vs by hand: max diff "
            f"{worst_step:.2e} | noise once: chi2 p={p_value:.3f} | adaptive+resume: max diff "
            f"{resume_diff:.2e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
