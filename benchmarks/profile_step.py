"""Where the time of one private step goes: CUDA time per phase and the top kernels.

python benchmarks/profile_step.py gpt bk fp32
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_grad_samplers as bench
from models import workloads


def phases(w, model, opt, x, y, dtype, device) -> dict[str, float]:
    """CUDA-event time of forward, backward, norms, clipping, sums and the update."""
    gs, clipper = opt.grad_sampler, opt.clipper
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(7)]
    opt.zero_grad(set_to_none=True)
    ev[0].record()
    with bench._autocast(device, dtype):
        loss = w.loss(model(x), y)
    ev[1].record()
    loss.backward()
    ev[2].record()
    sq = gs.per_sample_sq_norms()
    ev[3].record()
    f = clipper.clip_factors(sq)
    ev[4].record()
    sums = gs.clipped_sums(f)
    ev[5].record()
    opt._summed = {k: v.detach() for k, v in sums.items()}
    opt.backward_passes = 1
    opt.step()
    ev[6].record()
    torch.cuda.synchronize()
    names = ["forward", "backward", "norms", "clip", "sums", "noise+step"]
    return {n: round(ev[i].elapsed_time(ev[i + 1]), 3) for i, n in enumerate(names)}


def main(name: str, mode: str, dtype: str) -> None:
    device = torch.device("cuda")
    w = workloads()[name]
    torch.manual_seed(0)
    model = w.build().to(device)
    x, y = w.make_batch(w.batch, device, torch.Generator().manual_seed(0))
    step = bench._dpcore(mode)(w, model, device, dtype, x, y)
    for _ in range(3):
        step()
    opt = step.optimizer
    for _ in range(2):
        print(name, mode, dtype, phases(w, model, opt, x, y, dtype, device))
    if "--sync-debug" in sys.argv:  # where does the step wait for the GPU?
        torch.cuda.set_sync_debug_mode("warn")
        step()
        torch.cuda.set_sync_debug_mode(0)
        return
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    for key in ("cuda_time_total", "cpu_time_total"):
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--")][:3])
