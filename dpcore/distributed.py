"""Private distributed data parallel training on ``torch.distributed``.

Non-private DDP synchronises *raw* gradients during the backward pass. DP-SGD
cannot use them: every sample's gradient has to be clipped first, and noise has
to be added to the sum. So private DDP moves the synchronisation point to the
optimizer step:

* :class:`DPDDP` only makes all ranks start from the same parameters (a broadcast
  from rank 0 at construction); forward and backward are those of the plain model.
* The DP optimizer all-reduces each rank's *clipped* sum, with the noise (calibrated
  to the global batch) added on rank 0 only, so it is added exactly once; every rank
  divides by the global expected batch size and takes the same step.
* The ``distributed_poisson`` sampler gives each rank its shard of one Poisson
  sample of the whole data set at the global rate ``q``, which is what the
  accountant sees.

This module also holds the small helpers the engine uses: rank and world size,
a check that every rank was given the same configuration, a flattened all-reduce
and the refusal of plain :class:`~torch.nn.parallel.DistributedDataParallel`.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import DistributedError

__all__ = [
    "DPDDP",
    "all_reduce_sum_",
    "broadcast_object",
    "check_same_config",
    "collective_device",
    "config_fingerprint",
    "is_distributed",
    "process_group_from_env",
    "rank",
    "reject_plain_ddp",
    "require_initialized",
    "unwrap_model",
    "world_size",
]

#: environment variable that chooses the backend of :func:`process_group_from_env`
BACKEND_ENV = "DPCORE_DIST_BACKEND"

_INIT_HINT = (
    "Initialise the process group first, on every rank: launch with "
    "`torchrun --nproc-per-node N script.py` and call "
    "`torch.distributed.init_process_group(backend='nccl')` ('gloo' on CPU) before "
    "wrapping the model."
)


# ------------------------------------------------------------------------------------
# Process group queries
# ------------------------------------------------------------------------------------
def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised (any world size)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank; 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the default group; 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def require_initialized(what: str = "private distributed training") -> None:
    """Raise :class:`DistributedError` saying how to set up the process group."""
    if not dist.is_available():
        raise DistributedError(
            f"{what} needs torch.distributed, which this PyTorch build does not provide."
        )
    if not dist.is_initialized():
        raise DistributedError(
            f"{what} needs an initialised torch.distributed process group. {_INIT_HINT}"
        )


@contextlib.contextmanager
def process_group_from_env(backend: str | None = None) -> Iterator[bool]:
    """Join the process group that ``torchrun`` describes, for the duration of the block.

    If ``torchrun`` (or another launcher) set ``RANK`` and ``WORLD_SIZE`` and no group
    exists yet, initialise the default group and destroy it on exit. ``backend`` defaults
    to ``$DPCORE_DIST_BACKEND``, else NCCL when CUDA is available (this process on GPU
    ``LOCAL_RANK``), else gloo. Otherwise do nothing. Yields whether a process group exists inside the block.
    ``dpcore train`` runs inside this, so ``torchrun --nproc-per-node N -m dpcore train``
    works as it is.
    """
    created = False
    if (
        dist.is_available()
        and not dist.is_initialized()
        and "RANK" in os.environ
        and "WORLD_SIZE" in os.environ
    ):
        if backend is None:
            backend = os.environ.get(BACKEND_ENV) or (
                "nccl" if torch.cuda.is_available() else "gloo"
            )
        options: dict[str, Any] = {}
        if backend == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
            if "device_id" in inspect.signature(dist.init_process_group).parameters:
                options["device_id"] = device  # binds the group to this GPU (torch >= 2.3)
        dist.init_process_group(backend, **options)
        created = True
    try:
        yield is_distributed()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def collective_device() -> torch.device:
    """Where tensors handed to collectives must live: the current GPU for NCCL, else CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------
# Collectives
# ------------------------------------------------------------------------------------
def _buckets(tensors: Iterable[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    return buckets


def all_reduce_sum_(tensors: Mapping[str, Tensor] | Iterable[Tensor]) -> None:
    """Sum tensors over all ranks, in place, with one collective per (device, dtype).

    Flattening into one bucket keeps the number of collectives (and their latency)
    independent of the number of parameters.
    """
    values = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
    if not is_distributed() or not values:
        return
    target = collective_device()
    for (device, _), group in _buckets(values).items():
        flat = torch.cat([t.reshape(-1) for t in group]).to(target)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat.to(device)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def _broadcast_(tensors: Iterable[Tensor], src: int = 0) -> None:
    target = collective_device()
    for (device, _), group in _buckets(tensors).items():
        flat = torch.cat([t.detach().reshape(-1) for t in group]).to(target)
        dist.broadcast(flat, src=src)
        flat = flat.to(device)
        offset = 0
        with torch.no_grad():
            for t in group:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it (every rank must call this); ``obj`` if not distributed.

    Used e.g. to share rank 0's fresh seed when the configuration gives none.
    """
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=collective_device())
    return box[0]


# ------------------------------------------------------------------------------------
# Same configuration on every rank
# ------------------------------------------------------------------------------------
def _canonical(value: Any) -> Any:
    if hasattr(value, "model_dump"):  # pydantic models (EngineConfig)
        value = value.model_dump(mode="json")
    return json.loads(json.dumps(value, sort_keys=True, default=repr))


def config_fingerprint(config: Any) -> str:
    """SHA-256 of a canonical JSON form of ``config`` (a dict or a pydantic model)."""
    text = json.dumps(_canonical(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            sub = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                out.append(f"{sub}: {a.get(key, '<missing>')!r} vs {b.get(key, '<missing>')!r}")
            else:
                out.extend(_differences(a[key], b[key], sub))
        return out
    return [] if a == b else [f"{path or '(value)'}: {a!r} vs {b!r}"]


def check_same_config(config: Any, *, what: str = "engine configuration") -> None:
    """Raise :class:`DistributedError` unless every rank passes an identical ``config``.

    Every rank must call this (it is a collective). The fingerprints are all-gathered;
    on a mismatch the configurations themselves are gathered so that the error names
    the keys that differ and the ranks that disagree with rank 0. A no-op when not
    distributed.
    """
    if not is_distributed() or world_size() == 1:
        return
    digest = bytes.fromhex(config_fingerprint(config))[:8]
    mine = torch.tensor([int.from_bytes(digest, "little", signed=True)], dtype=torch.int64)
    mine = mine.to(collective_device())
    gathered = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(gathered, mine)
    values = [int(t.item()) for t in gathered]
    if len(set(values)) == 1:
        return
    # every rank saw the same mismatch, so every rank takes part in this second gather
    configs: list[Any] = [None] * world_size()
    dist.all_gather_object(configs, _canonical(config))
    lines = []
    for r in range(1, world_size()):
        if values[r] != values[0]:
            diff = "; ".join(_differences(configs[0], configs[r])) or "(differs)"
            lines.append(f"rank {r} vs rank 0: {diff}")
    raise DistributedError(
        f"the {what} differs between ranks: " + " | ".join(lines) + ". Every rank must "
        "be given the same configuration (same file, same arguments); otherwise ranks "
        "clip, noise or account differently and the privacy guarantee is undefined."
    )


# ------------------------------------------------------------------------------------
# The model wrapper
# ------------------------------------------------------------------------------------
class DPDDP(nn.Module):
    """Distributed data parallel for private training.

    ``model = dpcore.DPDDP(model)`` after ``init_process_group`` and before
    ``make_private``. At construction it copies rank 0's parameters and buffers to
    every rank; forward and backward then run the plain model with no communication
    (gradients are synchronised by the DP optimizer, after clipping, at ``step()``).

    It behaves like the wrapped model: unknown attributes are looked up on it,
    ``state_dict()`` has no ``module.`` prefix (so checkpoints load into the plain
    model and back), and ``named_parameters()`` uses the plain model's names.
    """

    def __init__(self, module: nn.Module, *, broadcast_buffers: bool = True) -> None:
        require_initialized("dpcore.DPDDP")
        reject_plain_ddp(module)
        super().__init__()
        self.module = module
        tensors = [p.data for p in module.parameters()]
        if broadcast_buffers:
            tensors += [b for b in module.buffers()]
        if world_size() > 1 and tensors:
            _broadcast_(tensors, src=0)
        self._register_load_state_dict_pre_hook(self._add_prefix)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "module" in modules:
                return getattr(modules["module"], name)
            raise

    # -- no wrapper prefix in names and state dicts ------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self.module.state_dict(*args, **kwargs)

    def _add_prefix(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Loading goes through nn.Module's recursion (also when DPDDP is nested in
        # another module), which looks for "<prefix>module.<key>"; the saved keys
        # have no "module." segment, so insert it here.
        for key in [k for k in state_dict if k.startswith(prefix)]:
            state_dict[f"{prefix}module.{key[len(prefix) :]}"] = state_dict.pop(key)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ):  # type: ignore[override]
        return self.module.named_parameters(prefix, recurse, remove_duplicate)

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):  # type: ignore[override]
        return self.module.named_buffers(prefix, recurse, remove_duplicate)

    def extra_repr(self) -> str:
        return f"world_size={world_size()}"


def unwrap_model(module: nn.Module) -> nn.Module:
    """The user's model inside a :class:`DPDDP` (or ``module`` itself)."""
    return module.module if isinstance(module, DPDDP) else module


def reject_plain_ddp(module: nn.Module) -> None:
    """Refuse ``torch.nn.parallel.DistributedDataParallel`` anywhere in ``module``.

    Plain DDP all-reduces the raw, unclipped gradients during backward: wasted
    communication at best, and a per-rank mix of unclipped gradients in ``p.grad``
    that a grad sampler reading ``p.grad`` would treat as private. Its hooks cannot
    be removed from the parameters, so dpcore does not try to unwrap it.
    """
    from torch.nn.parallel import DistributedDataParallel

    for path, sub in module.named_modules():
        if isinstance(sub, DistributedDataParallel):
            where = f" (at {path!r})" if path else ""
            raise DistributedError(
                f"the model is wrapped in torch.nn.parallel.DistributedDataParallel{where}, "
                "which synchronises unclipped gradients in backward. Use dpcore.DPDDP "
                "instead: build the plain model, then `model = dpcore.DPDDP(model)` "
                "(or `dpcore.DPDDP(ddp_model.module)` on a freshly built model)."
            )
