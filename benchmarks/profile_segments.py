"""Where a step's wall time goes: host issue time and GPU time of forward, backward and
optimizer step, and every device synchronisation inside the step (with its caller).

python benchmarks/profile_segments.py gpt:bf16 hf:bf16 --mode bk [--kernels]

``--kernels`` lists each segment's GPU kernels instead (CUDA graphs off).

Host times are measured without synchronising, so a segment's host time that is close
to its GPU time means the GPU waited for the host there.
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_summary


def segments(name: str, mode: str, dtype: str) -> None:
    step = profile_summary.make_step(name, mode, dtype)
    parts = step.parts  # type: ignore[attr-defined]
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    host: dict[str, list[float]] = {k: [] for k in ("fwd", "bwd", "step")}
    gpu: dict[str, list[float]] = {k: [] for k in ("fwd", "bwd", "step")}
    walls = []
    for _ in range(10):
        torch.cuda.synchronize()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        t = [time.perf_counter()]
        events[0].record()
        out = parts["forward"]()
        t.append(time.perf_counter())
        events[1].record()
        parts["backward"](out)
        t.append(time.perf_counter())
        events[2].record()
        parts["step"]()
        t.append(time.perf_counter())
        events[3].record()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t[0]) * 1e3)
        for i, k in enumerate(("fwd", "bwd", "step")):
            host[k].append((t[i + 1] - t[i]) * 1e3)
            gpu[k].append(events[i].elapsed_time(events[i + 1]))
    med = statistics.median
    print(
        f"SEGMENTS {name} {dtype} {mode:12} wall {med(walls):7.2f} ms | "
        + " | ".join(f"{k} host {med(host[k]):6.2f} gpu {med(gpu[k]):6.2f}" for k in host),
        flush=True,
    )
    if mode != "non-private":
        seen: set[str] = set()

        def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
            stack = "".join(traceback.format_stack(limit=12)[:-2])
            if stack not in seen:
                seen.add(stack)
                print(f"SYNC {message}\n{stack}", flush=True)

        old = warnings.showwarning
        warnings.showwarning = show
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            step()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = old


def kernels(name: str, mode: str, dtype: str, top: int = 12) -> None:
    """The GPU kernels of each segment, eager (CUDA graphs off so that each kernel shows)."""
    from torch.profiler import ProfilerActivity, profile

    step = profile_summary.make_step(name, mode, dtype)
    optimizer = getattr(step, "optimizer", None)
    if hasattr(optimizer, "cuda_graphs"):
        optimizer.cuda_graphs = False  # type: ignore[union-attr]
    parts = step.parts  # type: ignore[attr-defined]
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    for seg in ("forward", "backward", "step"):
        loss = parts["forward"]() if seg != "forward" else None
        if seg == "step":
            parts["backward"](loss)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            if seg == "forward":
                loss = parts["forward"]()
            elif seg == "backward":
                parts["backward"](loss)
            else:
                parts["step"]()
            torch.cuda.synchronize()
        if seg == "forward":
            parts["backward"](loss)
        if seg != "step":
            parts["step"]()
        cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
        events = prof.key_averages()
        total = sum(e.self_device_time_total for e in events if e.device_type == cuda) / 1e3
        print(f"KERNELS {name} {dtype} {mode} {seg}: {total:.2f} ms of kernels", flush=True)
        ops = [e for e in events if e.device_type == cpu and e.self_device_time_total > 0]
        for e in sorted(ops, key=lambda e: -e.self_device_time_total)[:top]:
            print(f"    {e.self_device_time_total / 1e3:7.3f} ms  x{e.count:<4} {e.key[:80]}")


def main() -> None:
    modes = [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "--mode"] or ["bk"]
    cases = [a for a in sys.argv[1:] if not a.startswith("--") and a not in modes]
    run = kernels if "--kernels" in sys.argv else segments
    for case in cases:
        name, dtype = case.split(":")
        for mode in ["non-private", *modes]:
            run(name, mode, dtype)


if __name__ == "__main__":
    main()
