"""Config-driven private training: what ``dpcore train`` runs, as a Python function.

A config is an :class:`~dpcore.config.EngineConfig` (top-level keys) plus a
``[train]`` table (:class:`TrainSettings`)::

    noise_multiplier = 1.1
    seed = 0
    [train]
    model = "mypkg.models:make_net"      # or a built-in name: "digits_cnn"
    dataset = "mypkg.data:load"          # returns (train, test) datasets; or "digits"
    lr = 0.5
    batch_size = 256
    epochs = 10

:func:`train` runs it: a checkpoint every ``checkpoint_every`` epochs (keeping
the last ``keep_last``), ``metrics.jsonl`` and a final ``model.pt`` in the run
directory; SIGTERM/SIGINT finish the current step, write a checkpoint and stop;
``resume="auto"`` continues from the newest valid checkpoint. Everything is
checked (imports, options, plugins) before the first step.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from .checkpoint import (
    is_main_process,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    unwrap_module,
)
from .config import EngineConfig, load_toml
from .errors import CheckpointError, ConfigError, DPCoreError

#: Built-in names accepted for ``[train] model`` and ``[train] dataset``.
BUILTIN_MODELS = {"digits_cnn": "dpcore.examples.digits:digits_cnn"}
BUILTIN_DATASETS = {"digits": "dpcore.examples.digits:digits"}
BUILTIN_LOSSES: dict[str, Callable[[], nn.Module]] = {
    "cross_entropy": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "nll": nn.NLLLoss,
}
#: ``[train] optimizer`` names -> torch.optim classes (or give ``module:callable``).
BUILTIN_OPTIMIZERS = {
    "sgd": "SGD",
    "adam": "Adam",
    "adamw": "AdamW",
    "rmsprop": "RMSprop",
    "adagrad": "Adagrad",
}

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------
def resolve_import(path: str, builtins: Mapping[str, str] | None = None) -> Any:
    """``"package.module:attr"`` (or a built-in name) -> the object it names."""
    target = (builtins or {}).get(path, path)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        known = f" (built-in names: {', '.join(sorted(builtins))})" if builtins else ""
        raise ValueError(
            f"{path!r} is neither a built-in name nor 'package.module:callable'{known}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} (from {path!r}): {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"{path!r} is not callable")
    return obj


class TrainSettings(BaseModel):
    """The ``[train]`` table of a config file."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        default="digits_cnn",
        description="built-in model name or 'package.module:callable' returning an nn.Module",
    )
    model_options: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the model factory"
    )
    dataset: str = Field(
        default="digits",
        description="built-in dataset name or 'package.module:callable' returning "
        "(train, test) datasets of (input, target) pairs; test may be None",
    )
    dataset_options: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the dataset factory"
    )
    loss: str = Field(
        default="cross_entropy",
        description="'cross_entropy', 'mse', 'nll' or 'package.module:callable' returning a loss "
        "module (mean or sum reduction, matching loss_reduction)",
    )
    optimizer: str = Field(
        default="sgd", description="sgd, adam, adamw, rmsprop, adagrad or 'package.module:Class'"
    )
    optimizer_options: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the optimizer (momentum, ...)"
    )
    lr: float = Field(default=0.1, gt=0, description="learning rate")
    batch_size: int = Field(
        default=256,
        gt=0,
        description="expected (logical) batch size; sample rate = 1 / ceil(N / batch_size)",
    )
    max_physical_batch_size: int | None = Field(
        default=None, gt=0, description="split logical batches for memory (BatchMemoryManager)"
    )
    epochs: int | None = Field(
        default=None, gt=0, description="epochs to train (default: the top-level `epochs`)"
    )
    checkpoint_every: int = Field(
        default=1,
        ge=0,
        description="write a checkpoint every this many epochs (0: only at the end)",
    )
    keep_last: int = Field(default=2, ge=1, description="checkpoints to keep in the run directory")
    epsilon_budget: float | None = Field(
        default=None, gt=0, description="stop before a step would spend more than this epsilon"
    )
    device: str = Field(default="cpu", description="'cpu', 'cuda', 'cuda:1' or 'auto'")
    eval_batch_size: int = Field(default=1024, gt=0)
    num_threads: int | None = Field(
        default=None,
        gt=0,
        description="torch CPU threads (torch.set_num_threads); default: torch's choice",
    )

    @field_validator("model")
    @classmethod
    def _model_importable(cls, v: str) -> str:
        resolve_import(v, BUILTIN_MODELS)
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset_importable(cls, v: str) -> str:
        resolve_import(v, BUILTIN_DATASETS)
        return v

    @field_validator("loss")
    @classmethod
    def _loss_known(cls, v: str) -> str:
        if v not in BUILTIN_LOSSES:
            resolve_import(v, {k: f"torch.nn:{c.__name__}" for k, c in BUILTIN_LOSSES.items()})
        return v

    @field_validator("optimizer")
    @classmethod
    def _optimizer_known(cls, v: str) -> str:
        if v.lower() not in BUILTIN_OPTIMIZERS:
            resolve_import(v, {k: f"torch.optim:{c}" for k, c in BUILTIN_OPTIMIZERS.items()})
        return v

    @field_validator("device")
    @classmethod
    def _device_valid(cls, v: str) -> str:
        if v != "auto":
            try:
                torch.device(v)
            except RuntimeError as exc:
                raise ValueError(str(exc)) from None
        return v


@dataclass(frozen=True)
class TrainConfig:
    """A validated config: the engine's part and the ``[train]`` table."""

    engine: EngineConfig
    train: TrainSettings
    source: str = "<dict>"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> TrainConfig:
        """Validate a config; errors name the offending key (e.g. ``train.lr``)."""
        raw_train = data.get("train", {})
        if not isinstance(raw_train, Mapping):
            raise ConfigError(f"{source}: [train] must be a table, got {type(raw_train).__name__}")
        try:
            engine = EngineConfig.from_dict(data)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, source, prefix="")) from None
        try:
            settings = TrainSettings.model_validate(dict(raw_train))
        except ValidationError as exc:
            raise ConfigError(_describe(exc, source, prefix="train.")) from None
        if settings.epochs is None and engine.epochs is None:
            raise ConfigError(f"{source}: train.epochs: give the number of epochs to train")
        return cls(engine=engine, train=settings, source=source)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> TrainConfig:
        return cls.from_dict(load_toml(Path(path)), source=str(path))

    @classmethod
    def default(cls) -> TrainConfig:
        """The built-in example (small CNN on scikit-learn's 8x8 digits)."""
        import tomllib

        from .examples.digits import DEFAULT_CONFIG_TOML

        return cls.from_dict(tomllib.loads(DEFAULT_CONFIG_TOML), source="<built-in digits example>")

    @property
    def epochs(self) -> int:
        if self.train.epochs is not None:
            return self.train.epochs
        assert self.engine.epochs is not None
        return math.ceil(self.engine.epochs)

    def to_dict(self) -> dict[str, Any]:
        data = self.engine.model_dump(mode="json", exclude_none=True)
        data["train"] = self.train.model_dump(mode="json", exclude_none=True)
        return data


def _describe(exc: ValidationError, source: str, *, prefix: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `dpcore config-schema` lists the keys)"
        # model-level checks name the key in their message ("accountant: unknown ...")
        lines.append(f"{prefix}{loc}: {msg}" if loc else f"{prefix}{msg}")
    return f"{source}: invalid config\n  " + "\n  ".join(lines)


def load_config(
    config: TrainConfig | Mapping[str, Any] | str | os.PathLike[str] | None,
) -> TrainConfig:
    if config is None:
        return TrainConfig.default()
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, Mapping):
        return TrainConfig.from_dict(config)
    if Path(config).suffix == ".json":  # a run directory's config.json
        try:
            data = json.loads(Path(config).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read config {str(config)!r}: {exc}") from None
        return TrainConfig.from_dict(data, source=str(config))
    return TrainConfig.from_toml(config)


# ----------------------------------------------------------------------------------------
# Building the pieces (all before the first step, so errors come early)
# ----------------------------------------------------------------------------------------
def _call(
    what: str, fn: Callable[..., Any], options: Mapping[str, Any], *args: Any, **fixed: Any
) -> Any:
    """``fn(*args, **fixed, **options)``; options that do not fit ``fn``'s signature are a
    config error naming ``what`` (errors raised inside ``fn`` are left alone)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no introspectable signature: just call it
        signature = None
    if signature is not None:
        try:
            signature.bind(*args, **fixed, **options)
        except TypeError as exc:
            raise ConfigError(f"{what}: {exc} (options given: {sorted(options)})") from None
    return fn(*args, **fixed, **options)


def build_model(settings: TrainSettings) -> nn.Module:
    model = _call(
        "train.model_options",
        resolve_import(settings.model, BUILTIN_MODELS),
        settings.model_options,
    )
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"train.model: {settings.model!r} returned {type(model).__name__}, "
            "not a torch.nn.Module"
        )
    return model


def build_datasets(settings: TrainSettings) -> tuple[Any, Any]:
    result = _call(
        "train.dataset_options",
        resolve_import(settings.dataset, BUILTIN_DATASETS),
        settings.dataset_options,
    )
    if isinstance(result, Mapping):
        train_set, test_set = result.get("train"), result.get("test")
    elif isinstance(result, tuple | list) and len(result) == 2:
        train_set, test_set = result
    else:
        train_set, test_set = result, None
    if train_set is None or not hasattr(train_set, "__len__") or len(train_set) == 0:
        raise ConfigError(
            f"train.dataset: {settings.dataset!r} returned no training data "
            "(expected (train, test) datasets with a length)"
        )
    return train_set, test_set


def build_loss(settings: TrainSettings, reduction: str) -> nn.Module:
    factory = BUILTIN_LOSSES.get(settings.loss)
    if factory is not None:
        return factory(reduction=reduction)  # type: ignore[call-arg]
    return resolve_import(settings.loss)()


def build_optimizer(settings: TrainSettings, model: nn.Module) -> torch.optim.Optimizer:
    name = BUILTIN_OPTIMIZERS.get(settings.optimizer.lower())
    cls = getattr(torch.optim, name) if name else resolve_import(settings.optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    return _call("train.optimizer_options", cls, settings.optimizer_options, params, lr=settings.lr)


def _device(settings: TrainSettings) -> torch.device:
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


# ----------------------------------------------------------------------------------------
# Stopping on signals
# ----------------------------------------------------------------------------------------
class StopRequest:
    """Set by SIGTERM/SIGINT; the loop finishes its current step, checkpoints and stops.
    A second SIGINT stops at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum: int, frame: Any) -> None:
            if self.signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signal = signum

        for s in previous:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _agree_to_stop(local: bool) -> bool:
    """All ranks must stop at the same step (or the next collective hangs)."""
    from . import distributed as dist

    if not dist.is_distributed() or dist.world_size() == 1:
        return local
    flag = torch.tensor([1.0 if local else 0.0], device=dist.collective_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item() > 0)


# ----------------------------------------------------------------------------------------
# The run directory
# ----------------------------------------------------------------------------------------
def checkpoint_name(epoch: int, step: int) -> str:
    return f"ckpt-e{epoch:04d}-s{step:08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Checkpoints of a run directory, newest (most steps) first."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []

    def key(p: Path) -> tuple[int, int, float]:
        parts = p.stem.split("-")
        try:
            return int(parts[2][1:]), int(parts[1][1:]), p.stat().st_mtime
        except (IndexError, ValueError):
            return -1, -1, p.stat().st_mtime

    return sorted(directory.glob("ckpt-e*-s*.pt"), key=key, reverse=True)


def newest_valid_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint that reads back; corrupted ones are skipped with a warning."""
    for path in list_checkpoints(run_dir):
        try:
            read_checkpoint(path)
        except CheckpointError as exc:
            warnings.warn(f"skipping checkpoint {path.name}: {exc}", stacklevel=2)
            continue
        return path
    return None


def _prune(run_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(run_dir)[keep_last:]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    for stale in (run_dir / CHECKPOINT_DIR).glob(".ckpt-*.tmp"):  # left by a killed save
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _append_metrics(run_dir: Path, record: Mapping[str, Any]) -> None:
    if not is_main_process():
        return
    with (run_dir / METRICS_FILE).open("a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()


# ----------------------------------------------------------------------------------------
# Privacy budget
# ----------------------------------------------------------------------------------------
def steps_within_budget(engine: Any, budget: float, delta: float, horizon: int) -> int:
    """How many more optimizer steps (at most ``horizon``) keep epsilon within ``budget``."""
    accountant = engine.accountant
    sigma = float(engine.noise_multiplier)
    rate = float(engine.sample_rate)
    separation = max(1, int(getattr(engine.sampler, "min_separation", 1)))
    start = int(engine.steps)

    def events(n: int) -> int:  # accountant events among real steps start .. start+n-1
        return _multiples_below(start + n, separation) - _multiples_below(start, separation)

    def epsilon_after(n: int) -> float:
        k = events(n)
        if k == 0:
            return float(accountant.get_epsilon(delta)) if len(accountant) else 0.0
        probe = _fresh_accountant(engine)
        probe.step(noise_multiplier=sigma, sample_rate=rate, steps=k)
        return float(probe.get_epsilon(delta))

    if epsilon_after(horizon) <= budget:
        return horizon
    lo, hi = 0, horizon  # epsilon_after(lo) <= budget < epsilon_after(hi)
    if epsilon_after(0) > budget:
        return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if epsilon_after(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def _multiples_below(n: int, m: int) -> int:
    """Number of t in [0, n) with t % m == 0."""
    return (n + m - 1) // m if n > 0 else 0


def _fresh_accountant(engine: Any) -> Any:
    """A copy of the engine's accountant (same plugin, options and history)."""
    from .registry import get_registry

    cfg = engine.accountant_config
    probe = get_registry().create("accountant", cfg.name, cfg.options)
    probe.load_state_dict(engine.accountant.state_dict())
    return probe


# ----------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------
Stop = Literal["completed", "interrupted", "budget"]


@dataclass
class TrainResult:
    """What :func:`train` did."""

    run_dir: Path
    stopped: Stop
    epochs_completed: int
    steps: int
    epsilon: float
    delta: float
    train_loss: float | None
    test_loss: float | None
    test_accuracy: float | None
    wall_time_s: float
    model: nn.Module = field(repr=False)
    engine: Any = field(repr=False)
    checkpoint: Path | None = None
    signal: str | None = None
    #: the canary audit's report (``audit=M``), a :class:`dpcore.audit.AuditReport`
    audit: Any = None


def default_run_dir(config: TrainConfig) -> Path:
    stem = Path(config.source).stem if not config.source.startswith("<") else "digits"
    return Path("runs") / stem


def train(
    config: TrainConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    resume: str | os.PathLike[str] | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    epochs: int | None = None,
    allow_config_change: bool = False,
    console: Any = None,
    progress: bool | None = None,
    stop: StopRequest | None = None,
    audit: int | None = None,
) -> TrainResult:
    """Run a private training job from a config (``None``: the built-in digits example).

    Args:
        config: a :class:`TrainConfig`, a dict, or a TOML path.
        resume: ``"auto"`` (newest valid checkpoint in ``run_dir``; start fresh if none)
            or the path of a checkpoint.
        run_dir: where checkpoints, ``metrics.jsonl`` and ``model.pt`` go
            (default ``runs/<config name>``).
        epochs: overrides ``[train] epochs`` (the total, counting resumed epochs).
        allow_config_change: resume from a checkpoint written with another privacy
            configuration; epsilon then composes both phases.
        console: a ``rich.console.Console`` for output (default: stdout).
        progress: show rich progress bars (default: when the console is a terminal).
        stop: a :class:`StopRequest` to stop the run from outside (tests, callbacks).
        audit: insert this many canaries and report one-run lower bounds on epsilon at
            the end (summary and ``metrics.jsonl``); see ``docs/auditing.md``.
    """
    from rich.console import Console

    if config is None and resume is not None and run_dir is not None:
        # `dpcore train --resume auto --run-dir DIR` continues DIR's own run
        recorded = Path(run_dir) / CONFIG_FILE
        config = recorded if recorded.is_file() else None
    cfg = load_config(config)
    console = console or Console()
    total_epochs = epochs if epochs is not None else cfg.epochs
    if total_epochs <= 0:
        raise ConfigError(f"epochs must be positive, got {total_epochs}")
    run_path = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    main = is_main_process()

    checkpoint = _checkpoint_to_resume(resume, run_path)
    if resume is None and list_checkpoints(run_path):
        raise ConfigError(
            f"run directory {str(run_path)!r} already has checkpoints; resume with "
            "--resume auto, or choose another --run-dir"
        )

    seed = cfg.engine.seed
    if seed is None:
        from .distributed import broadcast_object
        from .rng import fresh_seed

        # [distributed owner] one seed for all ranks (rank 0's); no-op in one process
        seed = broadcast_object(fresh_seed())
    engine_cfg = cfg.engine.model_copy(update={"seed": seed})

    # Everything that can fail on a bad config happens here, before any step.
    from . import distributed as dist
    from .rng import derive_seed

    device = _device(cfg.train)
    if cfg.train.num_threads is not None:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(derive_seed(seed, "model"))
    model = build_model(cfg.train).to(device)
    train_set, test_set = build_datasets(cfg.train)
    criterion = build_loss(cfg.train, engine_cfg.loss_reduction)
    optimizer = build_optimizer(cfg.train, model)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.train.batch_size)
    engine, model, optimizer, loader = _make_private(engine_cfg, model, optimizer, loader, dist)
    canary_audit = None
    if audit:
        if checkpoint is not None:
            raise ConfigError("--audit cannot resume a run: canary scores are not checkpointed")
        from .audit import CanaryAudit

        canary_audit = CanaryAudit(engine, canaries=audit).attach()

    start_epoch, resumed_from = 0, None
    if checkpoint is not None:
        extra = load_checkpoint(
            engine,
            path=checkpoint,
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            allow_config_change=allow_config_change,
        )
        start_epoch = int(extra.get("next_epoch", 0))
        resumed_from = checkpoint
    if main:
        run_path.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(
            run_path / CONFIG_FILE, json.dumps({**cfg.to_dict(), "seed": seed}, indent=2)
        )

    delta = engine_cfg.delta
    steps_per_epoch = len(loader)
    budget = cfg.train.epsilon_budget
    horizon = max(0, (total_epochs - start_epoch) * steps_per_epoch)
    step_limit = (
        int(engine.steps) + steps_within_budget(engine, budget, delta, horizon)
        if budget is not None
        else math.inf
    )
    if main:
        _print_header(
            console, cfg, engine, run_path, resumed_from, total_epochs, step_limit, budget
        )
    if resumed_from is not None:
        # epochs after this step may be logged again; the later record is the one that counts
        _append_metrics(
            run_path,
            {"event": "resumed", "step": int(engine.steps), "checkpoint": str(resumed_from)},
        )

    stop = stop or StopRequest()
    started = time.monotonic()
    result_stop: Stop = "completed"
    epoch = start_epoch
    last: dict[str, Any] = {}
    saved: Path | None = None
    show_progress = progress if progress is not None else console.is_terminal
    with stop.installed():
        while epoch < total_epochs:
            if int(engine.steps) >= step_limit:
                result_stop = "budget"
                break
            train_loss, result_stop, epoch_done = _run_epoch(
                model,
                optimizer,
                loader,
                criterion,
                engine,
                device,
                cfg,
                stop,
                step_limit,
                epoch,
                total_epochs,
                console,
                show_progress,
            )
            if epoch_done:
                test_loss, accuracy = _evaluate(model, test_set, criterion, device, cfg.train)
                last = {
                    "epoch": epoch + 1,
                    "step": int(engine.steps),
                    "train_loss": train_loss,
                    "test_loss": test_loss,
                    "test_accuracy": accuracy,
                    "epsilon": float(engine.get_epsilon(delta)),
                    "delta": delta,
                    "time_s": round(time.monotonic() - started, 3),
                }
                _append_metrics(run_path, last)
                if main and not show_progress:
                    console.print(_epoch_line(last, total_epochs), highlight=False, soft_wrap=True)
                epoch += 1
                every = cfg.train.checkpoint_every
                if (
                    (every and epoch % every == 0)
                    or epoch == total_epochs
                    or result_stop != "completed"
                ):
                    saved = _save(
                        engine, run_path, model, optimizer, loader, cfg, epoch, int(engine.steps)
                    )
            if result_stop != "completed":
                break
        # (still inside the handlers: a second SIGTERM must not cut these writes short)
        if result_stop != "completed" and (saved is None or _step_of(saved) != int(engine.steps)):
            saved = _save(engine, run_path, model, optimizer, loader, cfg, epoch, int(engine.steps))
        wall = time.monotonic() - started
        user_model = unwrap_module(model)
        if main and result_stop != "interrupted":
            from .checkpoint import atomic_save

            atomic_save(user_model.state_dict(), run_path / MODEL_FILE)
    epsilon = float(engine.get_epsilon(delta)) if len(engine.accountant) else 0.0
    result = TrainResult(
        run_dir=run_path,
        stopped=result_stop,
        epochs_completed=epoch if result_stop != "completed" else total_epochs,
        steps=int(engine.steps),
        epsilon=epsilon,
        delta=delta,
        train_loss=last.get("train_loss"),
        test_loss=last.get("test_loss"),
        test_accuracy=last.get("test_accuracy"),
        wall_time_s=wall,
        model=user_model,
        engine=engine,
        checkpoint=saved,
        signal=signal.Signals(stop.signal).name if stop.signal else None,
    )
    if canary_audit is not None and result.steps > 0:
        result.audit = canary_audit.report(claimed_epsilon=epsilon, delta=delta)
        _append_metrics(run_path, {"event": "audit", **result.audit.to_dict()})
    _append_metrics(
        run_path,
        {
            "event": result_stop,
            "step": result.steps,
            "epsilon": epsilon,
            "delta": delta,
            "signal": result.signal,
            "checkpoint": str(saved) if saved else None,
        },
    )
    if main:
        _print_summary(console, result, cfg, budget)
        if result.audit is not None:
            a = result.audit
            console.print(
                f"audit ({a.canaries} canaries): epsilon lower bound {a.epsilon_lower_bound:.3f} "
                f"(f-DP {a.epsilon_lower_bound_fdp:.3f}) vs claimed {a.claimed_epsilon:.3f}; "
                f"verdict {a.verdict}" + "".join(f"\n  - {r}" for r in a.reasons),
                highlight=False,
            )
    return result


def _checkpoint_to_resume(resume: str | os.PathLike[str] | None, run_dir: Path) -> Path | None:
    if resume is None:
        return None
    if str(resume) == "auto":
        found = newest_valid_checkpoint(run_dir)
        if found is None and list_checkpoints(run_dir):
            # Starting over would silently drop the privacy already spent on this run.
            raise CheckpointError(
                f"no checkpoint in {str(run_dir / CHECKPOINT_DIR)!r} can be read (see the "
                "warnings above); resume from a copy with --resume PATH, or start a new run "
                "with another --run-dir"
            )
        return found
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"--resume: checkpoint {str(path)!r} does not exist")
    return path


def _make_private(
    cfg: EngineConfig, model: nn.Module, optimizer: Any, loader: Any, dist: Any
) -> tuple[Any, nn.Module, Any, Any]:
    from .engine import PrivacyEngine

    if dist.is_distributed() and dist.world_size() > 1:
        model = dist.DPDDP(model)
    engine = PrivacyEngine.from_config(cfg)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader
    )
    return engine, model, optimizer, loader


def _save(
    engine: Any,
    run_dir: Path,
    model: nn.Module,
    optimizer: Any,
    loader: Any,
    cfg: TrainConfig,
    next_epoch: int,
    step: int,
) -> Path | None:
    """Checkpoint. ``next_epoch`` is the epoch a resumed run continues with; if the
    run stopped inside an epoch, the sampler's state holds the position within it."""
    path = run_dir / CHECKPOINT_DIR / checkpoint_name(next_epoch, step)
    written = save_checkpoint(
        engine,
        path=path,
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        next_epoch=next_epoch,
    )
    if written is not None:
        _prune(run_dir, cfg.train.keep_last)
    return written


def _step_of(path: Path) -> int:
    return int(path.stem.split("-s")[-1])


def _run_epoch(
    model: nn.Module,
    optimizer: Any,
    loader: Any,
    criterion: nn.Module,
    engine: Any,
    device: torch.device,
    cfg: TrainConfig,
    stop: StopRequest,
    step_limit: float,
    epoch: int,
    total_epochs: int,
    console: Any,
    show_progress: bool,
) -> tuple[float | None, Stop, bool]:
    """One epoch (or what is left of it after a resume). Stops only between optimizer
    steps, never inside a logical batch."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    model.train()
    loss_sum, count = 0.0, 0
    status: Stop = "completed"
    with contextlib.ExitStack() as stack:
        batches = loader
        if cfg.train.max_physical_batch_size is not None:
            from .data import BatchMemoryManager

            batches = stack.enter_context(
                BatchMemoryManager(
                    data_loader=loader,
                    max_physical_batch_size=cfg.train.max_physical_batch_size,
                    optimizer=optimizer,
                )
            )
        bar = stack.enter_context(
            Progress(
                TextColumn("epoch {task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("ε {task.fields[eps]}"),
                TimeElapsedColumn(),
                console=console,
                transient=False,
                disable=not (show_progress and is_main_process()),
            )
        )
        # Steps left in this epoch (fewer than len(loader) when resuming inside it).
        planned = len(loader) - int(_loader_position(loader))
        taken = 0
        visible = show_progress and is_main_process()
        eps = _safe_epsilon(engine, cfg.engine.delta) if visible else None
        task = bar.add_task(
            "train",
            total=len(loader),
            completed=len(loader) - planned,
            epoch=f"{epoch + 1}/{total_epochs}",
            loss="-",
            eps=f"{eps:.3f}" if eps is not None else "-",
        )
        at_boundary, done = True, True
        batch_iter = iter(batches)
        while True:
            # Decide before drawing the next batch, so the sampler's saved position is exact;
            # after the epoch's last step, let the loader finish the epoch.
            if at_boundary and taken < planned:
                interrupted = _agree_to_stop(bool(stop))
                if interrupted or int(engine.steps) >= step_limit:
                    status = "interrupted" if interrupted else "budget"
                    done = False
                    break
            try:
                inputs, targets = next(batch_iter)
            except StopIteration:
                break
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad()
            loss = criterion(model(inputs), targets)
            loss.backward()
            before = int(engine.steps)
            optimizer.step()
            n = int(targets.shape[0])
            if n:  # [distributed owner] an empty (local) batch has a NaN mean loss
                loss_sum += float(loss.detach()) * (n if cfg.engine.loss_reduction == "mean" else 1)
            count += n
            at_boundary = int(engine.steps) > before
            if at_boundary:
                taken += 1
                bar.update(task, advance=1, loss=f"{loss_sum / max(count, 1):.4f}")
        if done and _agree_to_stop(bool(stop)):
            status = "interrupted"  # the epoch is complete; a resumed run starts the next one
        eps = _safe_epsilon(engine, cfg.engine.delta) if visible else None
        bar.update(task, eps=f"{eps:.3f}" if eps is not None else "-")
    return (loss_sum / count if count else None), status, done


def _loader_position(loader: Any) -> int:
    """Batches of the current epoch already delivered (restored from a checkpoint)."""
    state_dict = getattr(loader, "state_dict", None)
    return int(state_dict().get("position", 0)) if callable(state_dict) else 0


def _safe_epsilon(engine: Any, delta: float) -> float | None:
    try:
        return float(engine.get_epsilon(delta)) if len(engine.accountant) else 0.0
    except DPCoreError:
        return None


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    dataset: Any,
    criterion: nn.Module,
    device: torch.device,
    settings: TrainSettings,
) -> tuple[float | None, float | None]:
    """Test loss and (for class-index targets) accuracy, on the plain model."""
    if dataset is None:
        return None, None
    net = unwrap_module(model)
    was_training = net.training
    net.eval()
    loss_sum, correct, count = 0.0, 0, 0
    classify = True
    for inputs, targets in torch.utils.data.DataLoader(
        dataset, batch_size=settings.eval_batch_size
    ):
        inputs, targets = inputs.to(device), targets.to(device)
        out = net(inputs)
        loss = criterion(out, targets)
        n = int(targets.shape[0])
        loss_sum += float(loss) * (n if getattr(criterion, "reduction", "mean") == "mean" else 1)
        if classify and out.dim() == 2 and targets.dim() == 1 and not targets.is_floating_point():
            correct += int((out.argmax(dim=1) == targets).sum())
        else:
            classify = False
        count += n
    net.train(was_training)
    return loss_sum / max(count, 1), (correct / count if classify and count else None)


# ----------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------
def _epoch_line(m: Mapping[str, Any], total: int) -> str:
    parts = [f"epoch {m['epoch']}/{total}", f"step {m['step']}"]
    if m.get("train_loss") is not None:
        parts.append(f"loss {m['train_loss']:.4f}")
    if m.get("test_accuracy") is not None:
        parts.append(f"test acc {m['test_accuracy']:.4f}")
    parts.append(f"ε {m['epsilon']:.3f} (δ={m['delta']:g})")
    return "  ".join(parts)


def _print_header(
    console: Any,
    cfg: TrainConfig,
    engine: Any,
    run_dir: Path,
    resumed: Path | None,
    epochs: int,
    step_limit: float,
    budget: float | None,
) -> None:
    e = cfg.engine
    console.print(
        f"[bold]dpcore train[/] {cfg.source} -> {run_dir}", highlight=False, soft_wrap=True
    )
    console.print(
        f"  σ={float(engine.noise_multiplier):.4g}  q={float(engine.sample_rate):.4g}  "
        f"C={e.max_grad_norm}  epochs={epochs}  grad_sampler={e.grad_sampler.name}  "
        f"clipper={e.clipper.name}  noise={e.noise.name}  sampler={e.sampler.name}  "
        f"accountant={e.accountant.name}  seed={engine.seed}",
        highlight=False,
        soft_wrap=True,
    )
    if resumed is not None:
        console.print(
            f"  resuming from {resumed} (step {int(engine.steps)})", highlight=False, soft_wrap=True
        )
    if budget is not None:
        console.print(
            f"  epsilon budget {budget:g}: at most {step_limit} steps",
            highlight=False,
            soft_wrap=True,
        )


def _print_summary(console: Any, r: TrainResult, cfg: TrainConfig, budget: float | None) -> None:
    from rich.table import Table

    table = Table(title="dpcore train: summary", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    rows = [
        ("status", r.stopped + (f" ({r.signal})" if r.signal else "")),
        ("epochs", f"{r.epochs_completed}"),
        ("optimizer steps", f"{r.steps}"),
        ("train loss", f"{r.train_loss:.4f}" if r.train_loss is not None else "-"),
        ("test loss", f"{r.test_loss:.4f}" if r.test_loss is not None else "-"),
        ("test accuracy", f"{r.test_accuracy:.4f}" if r.test_accuracy is not None else "-"),
        ("epsilon", f"{r.epsilon:.4f} (δ = {r.delta:g})"),
        ("wall time", f"{r.wall_time_s:.1f} s"),
        ("run directory", str(r.run_dir)),
    ]
    if r.checkpoint is not None:
        rows.append(("last checkpoint", str(r.checkpoint)))
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    if r.stopped == "budget":
        console.print(
            f"[yellow]stopped before exceeding the epsilon budget {budget}[/]: another step "
            f"would spend more (spent {r.epsilon:.4f}).",
            highlight=False,
            soft_wrap=True,
        )
    elif r.stopped == "interrupted":
        console.print(
            f"[yellow]interrupted by {r.signal}[/] after step {r.steps}; checkpoint written to "
            f"{r.checkpoint}. Continue with: dpcore train {_config_arg(cfg)}--resume auto "
            f"--run-dir {r.run_dir}",
            highlight=False,
            soft_wrap=True,
        )


def _config_arg(cfg: TrainConfig) -> str:
    return "" if cfg.source.startswith("<") else f"{cfg.source} "
