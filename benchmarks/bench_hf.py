"""Hugging Face GPT-2: private fine-tuning (full and LoRA) against non-private, and Opacus.

GPT-2 small (124M parameters, built from a config; no download), sequence length
512, batch 16, bf16 autocast. Modes, all in one process:

* ``non-private`` / ``non-private-lora``: plain AdamW training (the baselines);
* ``dpcore-bk`` / ``dpcore-bk-lora``: dpcore's book-keeping grad sampler, full
  fine-tuning / LoRA rank 16 on attention and MLP (``c_attn``, ``c_proj``, ``c_fc``);
* ``opacus-<mode>``: Opacus' modes when Opacus is installed (skipped otherwise).

Needs ``dpcore`` and the plugin (``pip install --no-deps -e plugins/dpcore-transformers``:
without it GPT-2's Conv1D has no layer sampler and the run refuses), ``transformers``,
and ``peft`` for the LoRA rows. Runs standalone::

    python benchmarks/bench_hf.py --out benchmarks/results/hf_h100     # GPU, full size
    python benchmarks/bench_hf.py --small --device cpu                 # seconds on a CPU

A step is ``zero_grad; forward (autocast); loss; backward; step``; the loss is the
mean over samples of each sample's mean token loss (``causal_lm_loss``). All modes are
built and warmed up (``--warmup`` steps) first; then each is timed in ``--rounds``
interleaved rounds of a few synchronised steps (``--steps`` in all per mode), so that a
drifting machine affects every mode alike. Time: the median step; ``step_ms_spread`` is
the fastest and slowest. Memory: peak allocated by torch while the mode was built and
warmed up (model and optimizer included), less what earlier modes hold. Each JSON row has
``model, mode, dtype, batch, step_ms, samples_per_s, peak_mem_gib, device`` (+ ``seq``,
ratios to the matching non-private baseline, the CUDA-graph replays of dpcore's step, and
``error`` for a mode that failed).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

NOISE, CLIP, LR = 1.0, 1.0, 1e-4


def build(small: bool, device: torch.device, lora: bool) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if small:
        cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64)
    else:
        cfg = GPT2Config()  # GPT-2 small: 12 layers, width 768, vocab 50257 (124M)
    cfg.attn_pdrop = cfg.resid_pdrop = cfg.embd_pdrop = 0.0
    model = GPT2LMHeadModel(cfg)
    if lora:
        import peft

        model = peft.get_peft_model(
            model,
            peft.LoraConfig(
                r=16, lora_alpha=32, target_modules=["c_attn", "c_proj", "c_fc"],
                lora_dropout=0.0, fan_in_fan_out=True,
            ),
        )  # fmt: skip
    return model.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> list[float]:
    """Milliseconds of each of ``steps`` synchronised steps after ``warmup``."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return times


def make_step(mode: str, model: torch.nn.Module, ids: torch.Tensor, dtype: torch.dtype | None):  # type: ignore[no-untyped-def]
    from dpcore_transformers import causal_lm_loss

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    loader = DataLoader(TensorDataset(ids), batch_size=len(ids))
    forward_model = model
    if mode.startswith("dpcore-"):
        import dpcore

        engine = dpcore.PrivacyEngine(accountant="rdp")
        forward_model, optimizer, _ = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=NOISE,
            max_grad_norm=CLIP, grad_sample_mode=mode.split("-")[1], seed=0, wrap_model=False,
        )  # fmt: skip
    elif mode.startswith("opacus-"):
        from opacus import PrivacyEngine

        opacus_mode = mode.removeprefix("opacus-")
        engine = PrivacyEngine()
        out = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=NOISE,
            max_grad_norm=CLIP, grad_sample_mode=opacus_mode, poisson_sampling=False,
            **({"criterion": torch.nn.CrossEntropyLoss()} if opacus_mode == "ghost" else {}),
        )  # fmt: skip
        forward_model, optimizer = out[0], out[1]
        if opacus_mode == "ghost":
            criterion = out[2]

            def opacus_ghost_step() -> None:
                optimizer.zero_grad()
                with autocast(ids.device, dtype):
                    logits = forward_model(input_ids=ids).logits
                loss = criterion(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
                loss.backward()
                optimizer.step()

            return opacus_ghost_step

    def step() -> None:
        optimizer.zero_grad()
        with autocast(ids.device, dtype):
            logits = forward_model(input_ids=ids).logits
        causal_lm_loss(logits, ids).backward()
        optimizer.step()

    def forward() -> torch.Tensor:
        optimizer.zero_grad()
        with autocast(ids.device, dtype):
            logits = forward_model(input_ids=ids).logits
        return causal_lm_loss(logits, ids)

    # for profile_summary.py and profile_segments.py
    step.optimizer = optimizer  # type: ignore[attr-defined]
    step.parts = {
        "forward": forward,
        "backward": lambda loss: loss.backward(),
        "step": optimizer.step,
    }  # type: ignore[attr-defined]
    return step


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def prepare(
    mode: str, args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, Any], Callable[[], None] | None]:
    """A mode's row and its step (None if it failed), after its warmup steps.

    The peak memory is the mode's own: what it allocated at most while it was built and
    warmed up, less what the modes built before it hold.
    """
    lora = mode.endswith("-lora")
    base_mode = mode.removesuffix("-lora")
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    seq, batch = (64, 4) if args.small else (args.seq, args.batch)
    row: dict[str, Any] = {
        "model": "gpt2-tiny" if args.small else "gpt2-124M", "mode": mode, "dtype": args.dtype,
        "batch": batch, "seq": seq, "step_ms": None, "samples_per_s": None,
        "peak_mem_gib": None, "device": device_name(device),
    }  # fmt: skip
    gc.collect()
    base = 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    try:
        model = build(args.small, device, lora)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
        step = make_step(base_mode, model, ids.to(device), dtype)
        timed(step, device, args.warmup, 0)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - base
            row["peak_mem_gib"] = round(peak / 2**30, 4)
        return row, step
    except Exception as exc:  # a failing mode gets a row with its error
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        if args.verbose:
            traceback.print_exc()
        return row, None


def measure(
    prepared: list[tuple[dict[str, Any], Callable[[], None] | None]],
    args: argparse.Namespace,
    device: torch.device,
) -> None:
    """Time the prepared modes in interleaved rounds (a few steps of each mode per round),
    so that drifts of the machine (clocks, a noisy host) fall on every mode alike."""
    live = [(row, step) for row, step in prepared if step is not None]
    times: dict[int, list[float]] = {id(row): [] for row, _ in live}
    per_round = max(1, -(-args.steps // args.rounds))
    for _ in range(args.rounds):
        for row, step in live:
            times[id(row)] += timed(step, device, 1, per_round)  # one step re-warms the mode
    for row, step in live:
        ms = statistics.median(times[id(row)])
        row["step_ms"] = round(ms, 2)
        row["step_ms_spread"] = [round(min(times[id(row)]), 2), round(max(times[id(row)]), 2)]
        row["samples_per_s"] = round(row["batch"] / ms * 1000, 2)
        graph = getattr(getattr(step, "optimizer", None), "_graph", None)
        if graph is not None:  # did the clip-and-noise stage replay from CUDA graphs?
            row["cuda_graphs"] = {
                "captures": graph.captures,
                "replays": graph.replays,
                "off": graph.disabled,
            }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def add_ratios(rows: list[dict[str, Any]]) -> None:
    base = {r["mode"]: r for r in rows if r["mode"].startswith("non-private")}
    for r in rows:
        b = base.get("non-private-lora" if r["mode"].endswith("-lora") else "non-private")
        if b is None or r is b or not r["step_ms"] or not b["step_ms"]:
            continue
        r["time_ratio"] = round(r["step_ms"] / b["step_ms"], 3)
        if r["peak_mem_gib"] and b["peak_mem_gib"]:
            r["mem_ratio"] = round(r["peak_mem_gib"] / b["peak_mem_gib"], 3)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | mode | dtype | batch | seq | step ms | x time | samples/s | peak GiB | x mem |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = [r["model"], r["mode"], r["dtype"], r["batch"], r["seq"], r["step_ms"],
                 r.get("time_ratio"), r["samples_per_s"], r["peak_mem_gib"], r.get("mem_ratio")]  # fmt: skip
        text = " | ".join("-" if c is None else str(c) for c in cells)
        if "error" in r:
            text += f" (failed: {r['error'][:80]})"
        lines.append(f"| {text} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny GPT-2, seq 64, batch 4")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds the timed steps are split into"
    )
    parser.add_argument("--modes", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (stable timings on a shared CPU)"
    )
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    from transformers.pytorch_utils import Conv1D

    import dpcore

    if dpcore.get_registry().layer_grad_sampler_for(Conv1D(2, 2)) is None:
        raise SystemExit(
            "dpcore-transformers is not installed: pip install --no-deps -e "
            "plugins/dpcore-transformers"
        )
    modes = ["non-private", "dpcore-bk", "non-private-lora", "dpcore-bk-lora"]
    try:
        import opacus  # noqa: F401

        modes += ["opacus-hooks", "opacus-ghost", "opacus-hooks-lora"]
    except ImportError:
        print("opacus is not installed: its modes are skipped")
    try:
        import peft  # noqa: F401
    except ImportError:
        print("peft is not installed: the LoRA rows are skipped")
        modes = [m for m in modes if not m.endswith("-lora")]
    device = torch.device(args.device)
    prepared = [prepare(mode, args, device) for mode in args.modes or modes]
    measure(prepared, args, device)
    rows = [row for row, _ in prepared]
    for row in rows:
        print(json.dumps(row))
    add_ratios(rows)
    table = markdown(rows)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)

        def flag(k: str, v: Any) -> str:
            name = f"--{k.replace('_', '-')}"
            if isinstance(v, bool):
                return name
            return f"{name} {' '.join(map(str, v)) if isinstance(v, list) else v}"

        command = "python benchmarks/bench_hf.py " + " ".join(
            flag(k, v) for k, v in vars(args).items() if v not in (None, False) and k != "out"
        )
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(f"`{command}`\n\n{table}\n")


if __name__ == "__main__":
    main()
