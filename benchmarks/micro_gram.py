"""Micro-benchmark: ways to reduce two per-sample Grams to ``Σ aa ⊙ gg`` (one GPU)."""

import torch

def bench(f, *args, n=50):
    for _ in range(5):
        f(*args)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        f(*args)
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n * 1e3

ways = {
    "mul_sum": lambda x, y: (x * y).sum((1, 2)),
    "bmm_dot": lambda x, y: torch.bmm(x.view(x.shape[0], 1, -1), y.view(y.shape[0], -1, 1)).view(-1),
    "einsum": lambda x, y: torch.einsum("bij,bij->b", x, y),
    "vecdot": lambda x, y: torch.linalg.vecdot(x.flatten(1), y.flatten(1)),
}
for b, t in [(16, 512), (32, 256)]:
    x = torch.randn(b, t, t, device="cuda")
    y = torch.randn(b, t, t, device="cuda")
    ref = (x.double() * y.double()).sum((1, 2))
    for k, f in ways.items():
        err = ((f(x, y).double() - ref).abs().max() / ref.abs().max()).item()
        print(f"B={b} T={t} {k:8} {bench(f, x, y):8.1f} us  rel err {err:.1e}")
