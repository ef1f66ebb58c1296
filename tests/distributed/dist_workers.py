"""Functions that run on every rank of a spawned gloo group (see ``dist_harness``).

Each takes ``(rank, world_size, *args)`` and returns plain data for the test to check.
They live in an importable module because spawned processes import them by name.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import dpcore
from dpcore import distributed as D
from dpcore.errors import DistributedError


def tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def wrapper_basics(rank: int, world_size: int) -> dict[str, Any]:
    """DPDDP syncs at construction, then leaves forward/backward alone."""
    model = tiny_model(seed=100 + rank)  # deliberately different per rank
    model.register_buffer("counter", torch.tensor([float(rank)]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = dpcore.DPDDP(model)
    after = {k: v.clone() for k, v in wrapped.state_dict().items()}
    x = torch.full((5, 4), float(rank + 1))
    wrapped(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in wrapped.named_parameters()}
    return {
        "before": before,
        "after": after,
        "grads": grads,
        "rank": D.rank(),
        "world_size": D.world_size(),
        "is_distributed": D.is_distributed(),
    }


def config_check(rank: int, world_size: int, differ: bool) -> str:
    config = {"noise_multiplier": 1.0, "sampler": {"name": "distributed_poisson"}, "seed": 3}
    if differ and rank == 1:
        config = {**config, "noise_multiplier": 0.5}
    try:
        D.check_same_config(config)
    except DistributedError as exc:
        return str(exc)
    return "ok"


def all_reduce_and_broadcast(rank: int, world_size: int) -> dict[str, Any]:
    tensors = {
        "a": torch.full((2, 3), float(rank + 1)),
        "b": torch.arange(4, dtype=torch.float64) * (rank + 1),
        "c": torch.tensor([rank + 1], dtype=torch.int64),
    }
    D.all_reduce_sum_(tensors)
    seed = D.broadcast_object(1000 + rank)
    return {"tensors": tensors, "seed": seed}


def plain_ddp_refused(rank: int, world_size: int) -> str:
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader

    ddp = DistributedDataParallel(tiny_model(0))
    messages = []
    try:
        dpcore.DPDDP(ddp)
    except DistributedError as exc:
        messages.append(str(exc))
    try:
        dpcore.PrivacyEngine().make_private(
            module=ddp,
            optimizer=torch.optim.SGD(ddp.parameters(), lr=0.1),
            data_loader=DataLoader(make_dataset(8, 4), batch_size=4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
    except DistributedError as exc:
        messages.append(str(exc))
    return " || ".join(messages) if len(messages) == 2 else "accepted"


def sampler_shards(rank: int, world_size: int, n: int, q: float, steps: int) -> dict[str, Any]:
    """Build the sampler as the engine would, with a different generator per rank."""
    from dpcore.rng import make_generator

    sampler = dpcore.get_registry().create(
        "sampler",
        "distributed_poisson",
        {"steps_per_epoch": steps},
        num_samples=n,
        sample_rate=q,
        generator=make_generator(7, "sampler", rank),
        rank=rank,
        world_size=world_size,
    )
    return {"batches": list(sampler), "state": sampler.state_dict()}


def make_private_mismatch(rank: int, world_size: int) -> str:
    """Rank 1 asks for another noise multiplier: make_private must refuse on every rank."""
    from torch.utils.data import DataLoader

    model = dpcore.DPDDP(make_model(0, 6))
    engine = dpcore.PrivacyEngine(accountant="rdp")
    try:
        engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(make_dataset(40, 6), batch_size=10),
            noise_multiplier=1.0 if rank == 0 else 1.1,
            max_grad_norm=1.0,
        )
    except DistributedError as exc:
        return str(exc)
    return "accepted"


def make_private_warnings(rank: int, world_size: int) -> dict[str, Any]:
    """Two likely slips: DPDDP forgotten; the non-private DDP loader passed."""
    import warnings

    from torch.utils.data import DataLoader, DistributedSampler

    out: dict[str, Any] = {}
    data = make_dataset(40, 6)
    for name, wrap, loader in [
        ("no_dpddp", False, DataLoader(data, batch_size=10)),
        (
            "distributed_sampler",
            True,
            DataLoader(data, batch_size=5, sampler=DistributedSampler(data)),
        ),
    ]:
        model = make_model(0, 6)
        module = dpcore.DPDDP(model) if wrap else model
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine = dpcore.PrivacyEngine(accountant="rdp")
            _, optimizer, _ = engine.make_private(
                module=module,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                data_loader=loader,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                seed=0,
            )
        out[name] = {
            "warnings": [str(w.message) for w in caught if issubclass(w.category, UserWarning)],
            "distributed": optimizer.distributed,
            "sampler": type(engine.sampler).__name__,
            "sample_rate": engine.sample_rate,
        }
    return out


def group_scenarios(rank: int, world_size: int) -> dict[str, Any]:
    """Every quick scenario of one process group, so that the group is spawned once."""
    return {
        "wrapper": wrapper_basics(rank, world_size),
        "config_equal": config_check(rank, world_size, False),
        "config_differ": config_check(rank, world_size, True),
        "collectives": all_reduce_and_broadcast(rank, world_size),
        "plain_ddp": plain_ddp_refused(rank, world_size),
        "sampler": sampler_shards(rank, world_size, 40, 0.3, 6),
        "make_private_mismatch": make_private_mismatch(rank, world_size),
        "warnings": make_private_warnings(rank, world_size),
    }


# ------------------------------------------------------------------------------------
# Private training runs (used on N ranks and, for references, in one process)
# ------------------------------------------------------------------------------------
DEFAULT_RUN: dict[str, Any] = {
    "n": 40,
    "d_in": 6,
    "batch_size": 10,  # global logical batch -> q = 1/4
    "grad_sample_mode": "hooks",
    "clipping": "flat",
    "noise_multiplier": 0.0,
    "max_grad_norm": 0.5,  # small enough that clipping is active
    "lr": 0.5,
    "steps": 6,
    "seed": 5,
    "mode": "plain",  # "plain" | "accumulate" (two backward passes per step) | "bmm"
    "ddp": True,
    "model_seed": 0,
    "save_at": None,  # real step after which a checkpoint is written
    "kill": False,  # SIGKILL every rank right after that checkpoint
    "resume": None,  # checkpoint to resume from
    "ckpt": None,
    "zero_gradients": False,  # loss * 0: p.grad after the step is pure noise / (qN)
    "faulty_noise": None,  # None | "same" | "independent": noise added on every rank
    "sampler": None,
    "noise": None,
    "empty_draws": False,  # only a label for the tests
}


def make_dataset(n: int, d_in: int) -> Any:
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(x, y, torch.arange(n))


def make_model(seed: int, d_in: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 5), nn.Tanh(), nn.Linear(5, 3))


def private_run(rank: int, world_size: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Train ``spec["steps"]`` real steps; return what the tests compare."""
    import os
    import signal

    from torch.utils.data import DataLoader

    spec = {**DEFAULT_RUN, **spec}
    model = make_model(spec["model_seed"] + (rank if spec["ddp"] else 0), spec["d_in"])
    if spec["ddp"]:
        model = dpcore.DPDDP(model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=spec["lr"])
    loader = DataLoader(make_dataset(spec["n"], spec["d_in"]), batch_size=spec["batch_size"])
    engine = dpcore.PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=spec["noise_multiplier"],
        max_grad_norm=spec["max_grad_norm"],
        grad_sample_mode=spec["grad_sample_mode"],
        clipping=spec["clipping"],
        seed=spec["seed"],
        # by default "poisson": distributed_poisson under DPDDP; in one process its draws
        # are the same global batches as the ranks' union
        sampler=spec["sampler"],
        noise=spec["noise"],
    )
    if spec["faulty_noise"]:
        _break_noise_once(optimizer, spec["faulty_noise"], spec["seed"], rank)
    if spec["resume"]:
        engine.load_checkpoint(
            path=spec["resume"], module=model, optimizer=optimizer, data_loader=loader
        )

    grads: list[torch.Tensor] = []
    batches: dict[int, list[int]] = {}
    local_sizes: list[int] = []

    def backward(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        (loss * 0.0 if spec["zero_gradients"] else loss).backward()

    def after_step() -> bool:
        """Record the step; checkpoint/kill; True when done."""
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
        if spec["save_at"] == engine.steps:
            engine.save_checkpoint(
                path=spec["ckpt"], module=model, optimizer=optimizer, data_loader=loader
            )
            if spec["kill"]:
                dist.barrier()  # the checkpoint is on disk before anyone dies
                os.kill(os.getpid(), signal.SIGKILL)
        return engine.steps >= spec["steps"]

    done = engine.steps >= spec["steps"]
    while not done:
        if spec["mode"] == "bmm":
            with dpcore.BatchMemoryManager(
                data_loader=loader, max_physical_batch_size=2, optimizer=optimizer
            ) as physical:
                current: list[int] = []
                for x, y, idx in physical:
                    before = engine.steps
                    current += idx.tolist()
                    optimizer.zero_grad()
                    backward(x, y)
                    optimizer.step()
                    if engine.steps > before:
                        batches[before] = current
                        local_sizes.append(len(current))
                        current = []
                        if done := after_step():
                            break
        else:
            for x, y, idx in loader:
                batches[engine.steps] = idx.tolist()
                local_sizes.append(len(idx))
                optimizer.zero_grad()
                if spec["mode"] == "accumulate":  # two backward passes, one step
                    half = len(x) // 2
                    backward(x[:half], y[:half])
                    backward(x[half:], y[half:])
                else:
                    backward(x, y)
                optimizer.step()
                if done := after_step():
                    break
    return {
        "initial": initial,
        "final": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": grads,
        "batches": batches,
        "local_sizes": local_sizes,
        "epsilon": engine.get_epsilon(1e-5),
        "accounted_steps": len(engine.accountant),
        "steps": engine.steps,
        "sampler": type(engine.sampler).__name__,
        "distributed": optimizer.distributed,
        "expected_batch_size": optimizer.expected_batch_size,
        "max_grad_norm": float(engine.clipper.max_grad_norm),
    }


def private_runs(rank: int, world_size: int, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Several runs in one process group (spawning is the slow part)."""
    return [private_run(rank, world_size, spec) for spec in specs]


def _break_noise_once(optimizer: Any, how: str, seed: int, rank: int) -> None:
    """Test-only faulty variant: every rank adds the noise (what dpcore must not do).

    "same": every rank draws from the same noise stream; "independent": each rank from
    its own. Used to show that the variance test rejects per-rank addition.
    """
    from dpcore import rng

    noise = optimizer.noise

    def faulty(grads: dict[str, torch.Tensor], std: float) -> None:
        noise.add_noise(grads, std=std, generator=optimizer.noise_generator)
        D.all_reduce_sum_(grads)

    if how == "independent":
        optimizer.noise_generator = rng.make_generator(seed, "noise", rank)
    optimizer._distributed_noise_and_reduce = faulty


def all_scenarios(rank: int, world_size: int) -> dict[str, Any]:
    """Everything the tests need from one live 2-rank group, spawned once per session."""
    from dist_specs import CONFIGS, NOISE_RUNS

    return {
        **group_scenarios(rank, world_size),
        "training": private_runs(rank, world_size, CONFIGS),
        "noise": {name: private_run(rank, world_size, spec) for name, spec in NOISE_RUNS.items()},
    }
