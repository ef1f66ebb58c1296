"""Step time and peak memory of private training against non-private training.

Every installed dpcore grad sampler, and Opacus' modes when Opacus is installed
(``pip install dpcore[bench]``; skipped cleanly when absent), on the three models of
:mod:`models`, all in one process so the ratios compare like with like::

    python benchmarks/bench_grad_samplers.py                       # GPU sizes, fp32 + bf16 gpt
    python benchmarks/bench_grad_samplers.py --small --device cpu  # seconds on a CPU
    python benchmarks/bench_grad_samplers.py --out benchmarks/results/h100

A step is ``zero_grad; forward; loss; backward; step`` (for private modes the DP
optimizer's step clips, adds noise and updates). Time: median over ``--steps``
steps after ``--warmup`` (device events on a GPU). Memory: peak allocated by torch
over the whole run of the mode, model and optimizer included. Modes that fail
(out of memory, unsupported layer) get a row with the error.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import Workload, workloads

app = typer.Typer(add_completion=False)
console = Console(width=160)

NOISE = 1.0
CLIP = 1.0
LR = 1e-4


# ----------------------------------------------------------------------------------------
# timing and memory
# ----------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


@contextlib.contextmanager
def _fresh(device: torch.device) -> Iterator[None]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


# ----------------------------------------------------------------------------------------
# the modes
# ----------------------------------------------------------------------------------------
def _loader(w: Workload, x: torch.Tensor) -> DataLoader:
    """A loader whose size gives the samplers a sample rate of 1/10 at this batch size."""
    return DataLoader(TensorDataset(torch.arange(10 * w.batch)), batch_size=w.batch)


def _autocast(device: torch.device, dtype: str) -> Any:
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _non_private(
    w: Workload,
    model: nn.Module,
    device: torch.device,
    dtype: str,
    x: torch.Tensor,
    y: torch.Tensor,
) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss = w.loss(model(x), y)
        loss.backward()
        opt.step()

    step.parts = _parts(w, model, opt, device, dtype, x, y)  # type: ignore[attr-defined]
    return step


def _parts(w, model, opt, device, dtype, x, y):  # type: ignore[no-untyped-def]
    """The step in three calls (for profile_segments.py)."""

    def forward():  # type: ignore[no-untyped-def]
        opt.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            return w.loss(model(x), y)

    return {"forward": forward, "backward": lambda loss: loss.backward(), "step": opt.step}


def _dpcore(mode: str) -> Callable[..., Callable[[], None]]:
    def setup(
        w: Workload,
        model: nn.Module,
        device: torch.device,
        dtype: str,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> Callable[[], None]:
        import dpcore

        opt = torch.optim.SGD(model.parameters(), lr=LR)
        try:
            engine = dpcore.PrivacyEngine(accountant="rdp")
            model, opt, _ = engine.make_private(
                module=model,
                optimizer=opt,
                data_loader=_loader(w, x),
                noise_multiplier=NOISE,
                max_grad_norm=CLIP,
                grad_sample_mode=mode,
                wrap_model=False,
                seed=0,
            )
        except dpcore.errors.ConfigError as exc:
            if "accountant" not in str(exc):
                raise
            engine, opt = None, _bare_dp_optimizer(model, opt, mode, w.batch, device)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with _autocast(device, dtype):
                loss = w.loss(model(x), y)
            loss.backward()
            opt.step()

        step.engine = engine  # type: ignore[attr-defined]  # keep it alive with the step
        step.optimizer = opt  # type: ignore[attr-defined]
        step.parts = _parts(w, model, opt, device, dtype, x, y)  # type: ignore[attr-defined]
        return step

    return setup


def _bare_dp_optimizer(
    model: nn.Module, opt: torch.optim.Optimizer, mode: str, batch: int, device: torch.device
) -> Any:
    """The DP optimizer without the engine (used while no accountant is installed):
    the same clipping, noise and update, without accounting."""
    import dpcore
    from dpcore.optimizer import DPOptimizer

    registry = dpcore.get_registry()
    gs = registry.create("grad_sampler", mode)
    gs.attach(model)
    clipper = registry.create(
        "clipper", "flat", max_grad_norm=CLIP, parameter_names=list(gs.named_parameters())
    )
    noise = registry.create("noise", "gaussian")
    gen = torch.Generator(device=device).manual_seed(0)
    dp = DPOptimizer(
        opt,
        grad_sampler=gs,
        clipper=clipper,
        noise=noise,
        noise_multiplier=NOISE,
        expected_batch_size=batch,
        noise_generator=gen,
        module=model,
    )
    model.register_forward_pre_hook(lambda *_: dp.flush())
    return dp


def _opacus(mode: str) -> Callable[..., Callable[[], None]]:
    def setup(
        w: Workload,
        model: nn.Module,
        device: torch.device,
        dtype: str,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> Callable[[], None]:
        import warnings

        from opacus import PrivacyEngine

        warnings.filterwarnings("ignore")
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        engine = PrivacyEngine()
        kwargs: dict[str, Any] = dict(
            module=model,
            optimizer=opt,
            data_loader=_loader(w, x),
            noise_multiplier=NOISE,
            max_grad_norm=CLIP,
            poisson_sampling=False,
            grad_sample_mode=mode,
        )
        if mode == "ghost":
            criterion = nn.CrossEntropyLoss()
            model, opt, criterion, _ = engine.make_private(criterion=criterion, **kwargs)

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                with _autocast(device, dtype):
                    out = model(x)
                    shape = out.shape if w.sequence else None
                    loss = criterion(out.flatten(0, -2).float(), y.flatten(), shape=shape)
                loss.backward()
                opt.step()
        else:
            model, opt, _ = engine.make_private(**kwargs)

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                with _autocast(device, dtype):
                    loss = w.loss(model(x), y)
                loss.backward()
                opt.step()

        return step

    return setup


def available_modes(only: list[str] | None) -> dict[str, Callable[..., Callable[[], None]]]:
    from dpcore import get_registry

    modes: dict[str, Callable[..., Callable[[], None]]] = {"non-private": _non_private}
    for name in get_registry().names("grad_sampler"):
        modes[f"dpcore-{name}"] = _dpcore(name)
    try:
        import opacus  # noqa: F401

        for name in ("hooks", "ghost", "ew"):
            modes[f"opacus-{name}"] = _opacus(name)
    except ImportError:
        console.print("[yellow]opacus is not installed: its modes are skipped[/]")
    if only:
        unknown = [m for m in only if m not in modes]
        if unknown:
            raise typer.BadParameter(f"unknown modes {unknown}; available: {list(modes)}")
        modes = {k: v for k, v in modes.items() if k in only or k == "non-private"}
    return modes


# ----------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------
def graph_stats(step: Callable[[], None]) -> dict[str, Any] | None:
    """How the DP optimizer's CUDA graphs fared in a timed run (None: not a dpcore step)."""
    graph = getattr(getattr(step, "optimizer", None), "_graph", None)
    if graph is None:
        return None
    return {"captures": graph.captures, "replays": graph.replays, "off": graph.disabled}


def run_one(
    w: Workload,
    mode: str,
    setup: Callable[..., Callable[[], None]],
    device: torch.device,
    dtype: str,
    warmup: int,
    steps: int,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "model": w.name,
        "mode": mode,
        "dtype": dtype,
        "batch": w.batch,
        "step_ms": None,
        "samples_per_s": None,
        "peak_mem_gib": None,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
    }
    with _fresh(device):
        try:
            torch.manual_seed(0)
            gen = torch.Generator().manual_seed(0)
            kwargs = {"expand_positions": True} if w.sequence and mode.startswith("opacus-") else {}
            model = w.build(**kwargs).to(device)
            x, y = w.make_batch(w.batch, device, gen)
            step = setup(w, model, device, dtype, x, y)
            times = _timed(step, device, warmup, steps)
            median = statistics.median(times)
            row.update(
                step_ms=round(median, 3),
                samples_per_s=round(w.batch / median * 1e3, 1),
                peak_mem_gib=_peak_gib(device),
                step_ms_spread=[round(min(times), 3), round(max(times), 3)],
                times=times,
            )
            graphs = graph_stats(step)
            if graphs is not None:
                row["cuda_graphs"] = graphs
            if kwargs:
                row["note"] = "position ids expanded to the batch (Opacus fails on broadcast ones)"
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            if not isinstance(exc, torch.cuda.OutOfMemoryError):
                row["traceback"] = traceback.format_exc(limit=-3)
        finally:
            model = step = x = y = None  # type: ignore[assignment]
    if row["peak_mem_gib"] is not None:
        row["peak_mem_gib"] = round(row["peak_mem_gib"], 4)
    return row


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a mode's sweeps: the median of all their timed steps, the largest peak
    memory, and each sweep's median (``step_ms_runs``); the first error, if any failed."""
    failed = [r for r in runs if "error" in r]
    row = dict(failed[0] if failed else runs[0])
    times = [t for r in runs for t in r.pop("times", [])] if not failed else []
    row.pop("times", None)
    if times:
        median = statistics.median(times)
        row.update(
            step_ms=round(median, 3),
            samples_per_s=round(row["batch"] / median * 1e3, 1),
            peak_mem_gib=max(r["peak_mem_gib"] for r in runs) if row["peak_mem_gib"] else None,
            step_ms_spread=[round(min(times), 3), round(max(times), 3)],
        )
        if len(runs) > 1:
            row["step_ms_runs"] = [r["step_ms"] for r in runs]
            graphs = [r["cuda_graphs"] for r in runs if "cuda_graphs" in r]
            if graphs:
                row["cuda_graphs"] = graphs
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    base = {(r["model"], r["dtype"]): r for r in rows if r["mode"] == "non-private"}
    for r in rows:
        b = base.get((r["model"], r["dtype"]))
        if b is None or r["step_ms"] is None or b["step_ms"] is None:
            continue
        r["time_ratio"] = round(r["step_ms"] / b["step_ms"], 3)
        if r["peak_mem_gib"] is not None and b["peak_mem_gib"]:
            r["mem_ratio"] = round(r["peak_mem_gib"] / b["peak_mem_gib"], 3)


def render(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="private vs non-private training step (median)")
    for col in (
        "model",
        "dtype",
        "batch",
        "mode",
        "step ms",
        "x time",
        "samples/s",
        "peak GiB",
        "x mem",
        "note",
    ):
        table.add_column(col, justify="right" if col not in ("model", "mode", "note") else "left")
    for r in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        table.add_row(
            r["model"],
            r["dtype"],
            str(r["batch"]),
            r["mode"],
            fmt(r["step_ms"], ".2f"),
            fmt(r.get("time_ratio"), ".2f"),
            fmt(r["samples_per_s"], ",.0f"),
            fmt(r["peak_mem_gib"], ".3f"),
            fmt(r.get("mem_ratio"), ".2f"),
            r.get("error", r.get("note", ""))[:70],
        )
    return table


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | dtype | batch | mode | step ms | x time | samples/s | peak GiB | x mem | note |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        note = r.get("error", r.get("note", "")).replace("|", "/")[:90]
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['mode']} | {fmt(r['step_ms'], '.2f')} "
            f"| {fmt(r.get('time_ratio'), '.2f')} | {fmt(r['samples_per_s'], ',.0f')} "
            f"| {fmt(r['peak_mem_gib'], '.3f')} | {fmt(r.get('mem_ratio'), '.2f')} | {note} |"
        )
    return "\n".join(lines) + "\n"


@app.command()
def main(
    models: list[str] = typer.Option(["mlp", "cnn", "gpt"], "--model", "-m", help="models to run"),
    modes: list[str] = typer.Option([], "--mode", help="modes (default: all available)"),
    dtypes: list[str] = typer.Option(
        [], "--dtype", help="fp32 and/or bf16 (default: fp32 for all models, bf16 autocast for gpt)"
    ),
    small: bool = typer.Option(False, help="CPU-sized models and batches"),
    device_name: str = typer.Option("cuda" if torch.cuda.is_available() else "cpu", "--device"),
    warmup: int = typer.Option(5, help="untimed steps first"),
    steps: int = typer.Option(20, help="timed steps (median reported)"),
    repeat: int = typer.Option(
        1,
        help="sweeps over the modes of each model (each mode built and timed afresh per sweep, "
        "so that a drifting machine slows every mode alike); a row's time is the median of all "
        "its timed steps, `step_ms_runs` the median of each sweep",
    ),
    out: Path | None = typer.Option(None, help="write OUT.json and OUT.md"),
) -> None:
    device = torch.device(device_name)
    suite = workloads(small=small)
    chosen = available_modes(modes or None)
    rows: list[dict[str, Any]] = []
    for name in models:
        w = suite[name]
        for dtype in dtypes or (["fp32", "bf16"] if w.sequence else ["fp32"]):
            sweeps = [
                {
                    mode: run_one(w, mode, setup, device, dtype, warmup, steps)
                    for mode, setup in chosen.items()
                }
                for _ in range(max(1, repeat))
            ]
            for mode in chosen:
                row = pooled([sweep[mode] for sweep in sweeps])
                rows.append(row)
                status = row.get("error") or f"{row['step_ms']} ms, {row['peak_mem_gib']} GiB"
                console.print(f"{name:4} {dtype:5} {mode:18} {status}")
    add_ratios(rows)
    console.print(render(rows))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "command": " ".join(["python", *sys.argv]),
            "torch": torch.__version__,
            "device": rows[0]["device"] if rows else device_name,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "warmup": warmup,
            "steps": steps,
            "repeat": repeat,
            "noise_multiplier": NOISE,
            "max_grad_norm": CLIP,
        }
        with contextlib.suppress(ImportError):
            import opacus

            meta["opacus"] = opacus.__version__
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        out.with_suffix(".md").write_text(
            f"Command: `{meta['command']}`\n\nDevice: {meta['device']}, torch {meta['torch']}"
            + (f", opacus {meta['opacus']}" if "opacus" in meta else "")
            + "\n\n"
            + markdown(rows)
        )
        console.print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    if any(math.isnan(r["step_ms"]) for r in rows if r["step_ms"] is not None):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
