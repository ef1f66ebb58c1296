"""Checkpoints of a private training run: exact, atomic and safe to load.

A checkpoint holds everything a resumed run needs to continue *as if it had
never stopped*: the unwrapped model's weights, the inner optimizer's state, the
engine's state (accountant history, clipper, noise, sampler position, seeded
generators, step and epoch counters, configuration), an LR scheduler, torch's
global random state (dropout) and any extra plain data the caller passes.

* **Atomic**: written to a temporary file in the same directory, flushed to
  disk, then renamed over the target, so a process killed mid-write leaves the
  previous checkpoint intact.
* **Safe**: only plain data (tensors, numbers, strings, lists, dicts) is stored
  and files are read with ``torch.load(weights_only=True)``; a file carrying
  pickled objects is refused instead of executed.
* **Checked**: a checkpoint whose privacy configuration differs from the
  engine's is refused with the differences named, unless the caller passes
  ``allow_config_change=True``; the accountant then composes both phases.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError

#: Bumped whenever the layout of a checkpoint file changes incompatibly.
FORMAT_VERSION = 1
_MAGIC = "dpcore_checkpoint"

#: Engine-state entries that decide the privacy guarantee; a resumed run must agree on
#: them (or the caller must say that the change is intended).
#: (The world size is not among them: the engine lets a run resume on another number of
#: ranks when its sampler re-shards exactly, and refuses otherwise. [distributed owner])
PRIVACY_STATE_KEYS = ("sample_rate", "noise_multiplier", "num_samples")
#: Config entries compared as well (components with their options, clipping bound).
PRIVACY_CONFIG_KEYS = ("max_grad_norm", "clipper", "noise", "sampler", "accountant")


# ----------------------------------------------------------------------------------------
# Ranks: the one place that decides who writes
# ----------------------------------------------------------------------------------------
def is_main_process() -> bool:
    """Only rank 0 writes checkpoints, metrics and final models (``dpcore train`` asks
    this function too)."""
    from .distributed import rank

    return rank() == 0


# ----------------------------------------------------------------------------------------
# Atomic, safe file IO
# ----------------------------------------------------------------------------------------
def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj)`` to ``path`` so that readers see the old file or the new one,
    never a partial one (temp file in the same directory, fsync, rename, fsync dir).

    ``obj`` must be plain data: if it holds anything else, the written file is read back
    with ``weights_only=True`` before it replaces ``path``, and refused if that fails, so
    a checkpoint that could not be loaded safely is never written.
    """
    target = Path(path)
    unusual = list(_non_plain(obj))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        # mkstemp creates the file private (0600); give it the permissions of a normal file.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if unusual:
            try:
                torch.load(tmp, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                raise CheckpointError(
                    f"not writing {str(target)!r}: it would not load with weights_only=True "
                    f"because {', '.join(unusual[:3])} {'is' if len(unusual) == 1 else 'are'} "
                    "not plain data. Store numbers, strings, lists, dicts and tensors only "
                    "(e.g. a state_dict() instead of the object)."
                ) from None
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)
    return target


_PLAIN_LEAVES = (
    type(None), bool, int, float, complex, str, bytes,
    torch.Tensor, torch.Size, torch.dtype, torch.device,
)  # fmt: skip


def _non_plain(obj: Any, where: str = "") -> Iterator[str]:
    """Where ``obj`` holds something other than plain data (e.g. ``['extra']['x'] (Foo)``)."""
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _non_plain(value, f"{where}[{key!r}]")
    elif isinstance(obj, list | tuple | set | frozenset):
        for i, value in enumerate(obj):
            yield from _non_plain(value, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN_LEAVES):
        yield f"{where or 'the object'} ({type(obj).__qualname__})"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def safe_load(path: str | os.PathLike[str]) -> Any:
    """Read a file written by :func:`atomic_save` without running any code from it."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickling_reason(exc)
        if "GLOBAL" in reason:
            raise CheckpointError(
                f"refused to load {str(p)!r}: it contains pickled objects, not only plain data "
                "(tensors, numbers, strings, lists, dicts). dpcore checkpoints never do; such a "
                "file can run code when unpickled, so do not load it with weights_only=False "
                f"unless you trust its source. ({reason})"
            ) from None
        raise CheckpointError(
            f"refused to load {str(p)!r}: it is corrupted or not a checkpoint of plain data "
            f"written by torch.save ({reason})"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {str(p)!r}: the file is truncated or corrupted "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from None


def _unpickling_reason(exc: BaseException) -> str:
    """The informative line of torch's weights-only unpickler error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or line.startswith("Unsupported"):
            return line
    return lines[0] if lines else type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and validate the layout of a dpcore checkpoint (no engine needed)."""
    data = safe_load(path)
    if not isinstance(data, dict) or _MAGIC not in data:
        raise CheckpointError(f"{str(path)!r} is not a dpcore checkpoint")
    version = data[_MAGIC]
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} has checkpoint format {version}; this dpcore reads format "
            f"{FORMAT_VERSION}. Load it with the dpcore version that wrote it."
        )
    for key in ("engine", "module"):
        if key not in data:
            raise CheckpointError(f"{str(path)!r} is incomplete: it has no {key!r} entry")
    return data


# ----------------------------------------------------------------------------------------
# Unwrapping
# ----------------------------------------------------------------------------------------
def unwrap_module(module: nn.Module) -> nn.Module:
    """The user's own module inside dpcore/DDP wrappers (parameters named as the user
    named them)."""
    from .distributed import DPDDP

    for _ in range(16):  # PrivateModule(DPDDP(model)) and the like
        inner = getattr(module, "_module", None)
        if not isinstance(inner, nn.Module) and isinstance(
            module, nn.parallel.DistributedDataParallel | DPDDP
        ):
            inner = module.module
        if not isinstance(inner, nn.Module):
            break
        module = inner
    return module


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The inner torch optimizer of a DP optimizer (or the optimizer itself)."""
    inner = getattr(optimizer, "original_optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


# ----------------------------------------------------------------------------------------
# Global random state (dropout and other module-level randomness)
# ----------------------------------------------------------------------------------------
def _global_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _set_global_rng_state(state: Mapping[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------------------
# Privacy configuration check
# ----------------------------------------------------------------------------------------
def privacy_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two engine states' privacy configuration."""
    diffs = []
    for key in PRIVACY_STATE_KEYS:
        a, b = saved.get(key), current.get(key)
        if a is not None and b is not None and not _same(a, b):
            diffs.append(f"{key}: checkpoint {a!r}, engine {b!r}")
    saved_cfg = saved.get("config") or {}
    current_cfg = current.get("config") or {}
    for key in PRIVACY_CONFIG_KEYS:
        if key in saved_cfg and key in current_cfg and not _same(saved_cfg[key], current_cfg[key]):
            diffs.append(f"{key}: checkpoint {saved_cfg[key]!r}, engine {current_cfg[key]!r}")
    return diffs


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(a)))
        except (TypeError, ValueError):
            return False
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# ----------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------
def build_checkpoint(
    engine: Any,
    *,
    module: nn.Module,
    optimizer: Any,
    data_loader: Any = None,
    lr_scheduler: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """The checkpoint as a plain dict (what :func:`save_checkpoint` writes)."""
    from . import __version__

    _require_step_boundary(optimizer)

    checkpoint: dict[str, Any] = {
        _MAGIC: FORMAT_VERSION,
        "dpcore_version": __version__,
        "engine": engine.state_dict(),
        "module": unwrap_module(module).state_dict(),
        "optimizer": unwrap_optimizer(optimizer).state_dict() if optimizer is not None else None,
        "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
        "rng": _global_rng_state(),
        "extra": dict(extra),
    }
    # The engine's own loader is in the engine state already (sampler position included).
    loader_state = (
        None if data_loader is getattr(engine, "data_loader", None) else _loader_state(data_loader)
    )
    if loader_state is not None:
        checkpoint["data_loader"] = loader_state
    return checkpoint


def _require_step_boundary(optimizer: Any) -> None:
    """Clipped gradients of a logical batch in progress are not part of a checkpoint."""
    grad_sampler = getattr(optimizer, "grad_sampler", None)
    pending = grad_sampler is not None and grad_sampler.has_pending()
    if pending or getattr(optimizer, "backward_passes", 0) > 0:
        raise CheckpointError(
            "cannot checkpoint in the middle of a step: the optimizer holds clipped gradients "
            "of a batch it has not stepped on yet (a backward pass, or physical batches of a "
            "BatchMemoryManager logical batch). Save right after optimizer.step()."
        )


def _loader_state(data_loader: Any) -> dict[str, Any] | None:
    """State of a stateful data loader that the engine does not already track."""
    if data_loader is None:
        return None
    state_dict = getattr(data_loader, "state_dict", None)
    return state_dict() if callable(state_dict) else None


def save_checkpoint(
    engine: Any,
    *,
    path: str | os.PathLike[str],
    module: nn.Module,
    optimizer: Any,
    data_loader: Any = None,
    lr_scheduler: Any = None,
    **extra: Any,
) -> Path | None:
    """Write a checkpoint atomically; returns its path (``None`` on ranks other than 0,
    which write nothing).

    ``extra`` is stored as is and returned by :func:`load_checkpoint`; it must be
    plain data (numbers, strings, lists, dicts, tensors).
    """
    if not is_main_process():
        return None
    checkpoint = build_checkpoint(
        engine,
        module=module,
        optimizer=optimizer,
        data_loader=data_loader,
        lr_scheduler=lr_scheduler,
        **extra,
    )
    return atomic_save(checkpoint, path)


def load_checkpoint(
    engine: Any,
    *,
    path: str | os.PathLike[str],
    module: nn.Module,
    optimizer: Any = None,
    data_loader: Any = None,
    lr_scheduler: Any = None,
    allow_config_change: bool = False,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint into ``module`` (wrapped or not), ``optimizer`` (DP or the
    plain one, before ``make_private``), the engine and the scheduler.

    Returns the ``extra`` data saved with it. ``restore_rng`` also restores torch's
    global random state (dropout masks and other module-level randomness), which an
    exact resume needs; pass False to keep the current one.

    Raises :class:`~dpcore.errors.CheckpointError` if the file is unreadable or unsafe,
    or if its privacy configuration differs from the engine's and
    ``allow_config_change`` is False. With ``allow_config_change=True`` the saved
    accountant history is kept and later steps are composed onto it, so
    ``engine.get_epsilon`` covers both phases.
    """
    data = read_checkpoint(path)
    saved_engine: dict[str, Any] = data["engine"]
    current = _engine_state_or_none(engine)
    if current is not None:
        engine_state = reconcile_state(
            saved_engine, current, allow_config_change=allow_config_change, source=str(path)
        )
    else:
        # Before make_private the engine keeps the state and reconciles it (same check)
        # when the run's configuration exists.
        # The accountant is known already (it is restored at once): check it here.
        engine_state = {**saved_engine, "allow_config_change": bool(allow_config_change)}
        if allow_config_change:
            engine_state["accountant"] = _composed_accountant_state(saved_engine, engine)
        else:
            saved_acc = (saved_engine.get("config") or {}).get("accountant")
            current_acc = getattr(engine, "accountant_config", None)
            if saved_acc is not None and current_acc is not None:
                current_dump = current_acc.model_dump()
                if not _same(saved_acc, current_dump):
                    raise CheckpointError(
                        f"{str(path)!r} was written with a different privacy configuration:\n"
                        f"  accountant: checkpoint {saved_acc!r}, engine {current_dump!r}\n"
                        "Resume with the same configuration, or pass allow_config_change=True."
                    )

    target = unwrap_module(module)
    try:
        target.load_state_dict(data["module"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit this model: {_first_line(exc)}"
        ) from None
    if optimizer is not None and data.get("optimizer") is not None:
        # through the DP optimizer (it delegates to the inner one and keeps sharing its
        # param groups with it, which LR schedulers rely on)
        optimizer.load_state_dict(data["optimizer"])
    if lr_scheduler is not None and data.get("lr_scheduler") is not None:
        lr_scheduler.load_state_dict(data["lr_scheduler"])
    engine.load_state_dict(engine_state)
    loader_state = data.get("data_loader")
    if data_loader is not None and loader_state is not None and engine_state is saved_engine:
        load = getattr(data_loader, "load_state_dict", None)
        if callable(load):
            load(loader_state)
    if restore_rng and data.get("rng"):
        _set_global_rng_state(data["rng"])
    return dict(data.get("extra") or {})


def _engine_state_or_none(engine: Any) -> dict[str, Any] | None:
    """The engine's current state, or None before ``make_private``."""
    if getattr(engine, "optimizer", True) is None:
        return None
    return dict(engine.state_dict())


def reconcile_state(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    allow_config_change: bool | None = None,
    source: str = "the checkpoint",
) -> Mapping[str, Any]:
    """The engine state to load for a run configured as ``current``.

    Same privacy configuration: ``saved`` itself. Different: a
    :class:`~dpcore.errors.CheckpointError` naming every difference, unless
    ``allow_config_change`` (or the ``"allow_config_change"`` flag that
    :func:`load_checkpoint` puts in a state loaded before ``make_private``) is true;
    then the merged state of :func:`merge_changed_config`.
    """
    if allow_config_change is None:
        allow_config_change = bool(saved.get("allow_config_change", False))
    diffs = privacy_differences(saved, current)
    if not diffs:
        return saved
    if not allow_config_change:
        raise CheckpointError(
            f"{source} was written with a different privacy configuration:\n  "
            + "\n  ".join(diffs)
            + "\nResume with the same configuration, or pass allow_config_change=True "
            "(CLI: --allow-config-change) to continue under the new one; the accountant then "
            "composes the privacy spent in both phases."
        )
    return merge_changed_config(saved, current)


def merge_changed_config(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """Engine state for a run that continues a checkpoint under a new privacy configuration.

    Kept from the checkpoint: the accountant history (so epsilon composes both phases),
    the step counter and the seeded generators. Kept from the new run: the
    configuration and the state of every component whose configuration changed; the
    sampler restarts its epoch unless rate, data set size and world size are unchanged.
    """
    merged = dict(current)
    for key in ("steps", "generators"):
        if key in saved:
            merged[key] = saved[key]
    saved_cfg = saved.get("config") or {}
    current_cfg = current.get("config") or {}
    for key in ("clipper", "noise", "sampler"):
        if key in saved and _same(saved_cfg.get(key), current_cfg.get(key)):
            if key == "sampler" and not all(
                _same(saved.get(k), current.get(k)) for k in ("sample_rate", "num_samples")
            ):
                continue  # a position within an epoch means nothing at another rate or size
            merged[key] = saved[key]
    merged["accountant"] = {
        **dict(current.get("accountant") or {}),
        "history": list((saved.get("accountant") or {}).get("history", [])),
    }
    return merged


def _composed_accountant_state(saved: Mapping[str, Any], engine: Any) -> dict[str, Any]:
    """The saved history in the format of the engine's (possibly other) accountant."""
    return {
        **dict(engine.accountant.state_dict()),
        "history": list((saved.get("accountant") or {}).get("history", [])),
    }
