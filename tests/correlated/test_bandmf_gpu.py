"""``bandmf`` on a CUDA device: buffers stay on the device, the stream is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import solve_triangular

from dpcore.correlated import strategy_matrix
from dpcore.registry import get_registry
from dpcore.rng import make_generator, standard_normal


@pytest.mark.gpu
def test_cuda_stream_matches_dense_solve_and_gaussian() -> None:
    device = torch.device("cuda")
    noise = get_registry().create("noise", "bandmf", {"bands": 5})
    gen, replay = (
        make_generator(3, "noise", device=device),
        make_generator(3, "noise", device=device),
    )
    emitted, drawn = [], []
    for _ in range(20):
        grads = {"w": torch.zeros(64, 8, device=device, dtype=torch.bfloat16)}
        noise.add_noise(grads, std=0.5, generator=gen)
        emitted.append(grads["w"].float().cpu().numpy().ravel())
        drawn.append(
            (standard_normal((64, 8), generator=replay, device=device) * 0.5).cpu().numpy().ravel()
        )
    assert all(
        t.device.type == "cuda" and t.dtype == torch.float32
        for t in noise.state_dict()["history"]["w"]
    )
    dense = solve_triangular(
        strategy_matrix(noise.coefs, 20), np.array(drawn, dtype=np.float64), lower=True
    )
    np.testing.assert_allclose(np.array(emitted), dense, atol=2e-2 * np.abs(dense).max())

    one = get_registry().create("noise", "bandmf", {"bands": 1})
    gaussian = get_registry().create("noise", "gaussian", {})
    a = {"w": torch.zeros(33, device=device)}
    b = {"w": torch.zeros(33, device=device)}
    one.add_noise(a, std=0.7, generator=make_generator(1, "noise", device=device))
    gaussian.add_noise(b, std=0.7, generator=make_generator(1, "noise", device=device))
    assert torch.equal(a["w"], b["w"])
