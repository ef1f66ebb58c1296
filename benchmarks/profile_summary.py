"""Is a private step bound by the GPU or by the host? One line per (model, mode, dtype).

python benchmarks/profile_summary.py mlp:fp32 cnn:fp32 gpt:fp32 gpt:bf16 hf:bf16 --mode bk

(``hf`` is bench_hf.py's GPT-2 124M case and needs dpcore-transformers installed.)

For each case: the step's wall time (synchronised), the host time to *issue* it (no
synchronisation: when close to the wall time the step is host-bound), the summed GPU
kernel time and kernel count per step, and the top kernels and CPU ops of the private
mode. ``--sync-debug`` also reports any device synchronisation inside the step.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_grad_samplers as bench
from models import workloads


def _workload_step(name: str, mode: str, dtype: str):  # type: ignore[no-untyped-def]
    device = torch.device("cuda")
    w = workloads()[name]
    torch.manual_seed(0)
    model = w.build().to(device)
    x, y = w.make_batch(w.batch, device, torch.Generator().manual_seed(0))
    setup = bench._non_private if mode == "non-private" else bench._dpcore(mode)
    return setup(w, model, device, dtype, x, y)


def _hf_step(mode: str, dtype: str, lora: bool = False):  # type: ignore[no-untyped-def]
    """GPT-2 124M, seq 512, batch 16 (bench_hf.py's case; needs dpcore-transformers)."""
    import bench_hf

    device = torch.device("cuda")
    model = bench_hf.build(False, device, lora=lora)
    ids = torch.randint(
        0, model.config.vocab_size, (16, 512), generator=torch.Generator().manual_seed(0)
    )
    mode = mode if mode == "non-private" else f"dpcore-{mode}"
    return bench_hf.make_step(
        mode, model, ids.to(device), torch.bfloat16 if dtype == "bf16" else None
    )


def make_step(name: str, mode: str, dtype: str):  # type: ignore[no-untyped-def]
    """The benchmark step of a case: a workload of models.py, or ``hf``/``hflora``."""
    if name.startswith("hf"):
        return _hf_step(mode, dtype, lora=name == "hflora")
    return _workload_step(name, mode, dtype)


def measure(name: str, mode: str, dtype: str, top: int) -> None:
    device = torch.device("cuda")
    step = make_step(name, mode, dtype)
    wall = statistics.median(bench._timed(step, device, 5, 20))
    host = []
    for _ in range(10):
        torch.cuda.synchronize()
        # a long kernel first, so the issuing never waits for the GPU to catch up
        torch.cuda._sleep(int(2e9))
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    steps = 3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.device_time for e in kernels) / 1e3 / steps
    graph = getattr(getattr(step, "optimizer", None), "_graph", None)
    graphs = (
        f"  graphs: {graph.captures} captured, {graph.replays} replays, off: {graph.disabled}"
        if graph is not None
        else ""
    )
    print(
        f"SUMMARY {name:4} {dtype:5} {mode:12} wall {wall:8.3f} ms  host {statistics.median(host):8.3f} ms"
        f"  gpu {gpu_ms:8.3f} ms  kernels/step {len(kernels) / steps:6.0f}{graphs}",
        flush=True,
    )
    if mode != "non-private" and top:
        if "--sync-debug" in sys.argv:
            torch.cuda.set_sync_debug_mode("warn")
            step()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(0)
        table = prof.key_averages().table(
            sort_by="cuda_time_total", row_limit=top, max_name_column_width=70
        )
        print(table)
        table = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=70
        )
        print(table, flush=True)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    modes = [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "--mode"] or ["bk"]
    args = [a for a in args if a not in modes]
    a = torch.randn(4, 64, 32, device="cuda", dtype=torch.bfloat16)
    try:
        r = torch.bmm(a, a.mT, out_dtype=torch.float32)
        print("bmm out_dtype:", r.dtype)
    except Exception as exc:
        print("bmm out_dtype unsupported:", type(exc).__name__, str(exc)[:200])
    try:
        r = torch.mm(a[0], a[0].mT, out_dtype=torch.float32)
        print("mm out_dtype:", r.dtype)
    except Exception as exc:
        print("mm out_dtype unsupported:", type(exc).__name__, str(exc)[:200])
    for case in args:
        name, dtype = case.split(":")
        for mode in ["non-private", *modes]:
            measure(name, mode, dtype, top=20)


if __name__ == "__main__":
    main()
