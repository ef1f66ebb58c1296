"""The configurations the distributed tests run (imported by the spawned ranks too)."""

from __future__ import annotations

from dpcore.registry import get_registry

#: noiseless runs compared with one process on the union batch (test_training.py)
CONFIGS = [
    {"grad_sample_mode": "hooks"},
    {"grad_sample_mode": "hooks", "mode": "accumulate"},
    {"grad_sample_mode": "hooks", "mode": "bmm"},
    {"grad_sample_mode": "functorch"},
    {"grad_sample_mode": "ew"},
    {"grad_sample_mode": "ew", "n": 8, "batch_size": 2, "empty_draws": True},
    {"grad_sample_mode": "ghost"},
    {"grad_sample_mode": "bk"},
    {"grad_sample_mode": "bk", "mode": "bmm"},
    {"grad_sample_mode": "bk", "clipping": "automatic"},
    {"grad_sample_mode": "hooks", "clipping": "adaptive"},
    # a local expected batch of 1: ranks often draw nothing and must still take the step
    {"grad_sample_mode": "hooks", "n": 8, "batch_size": 2, "empty_draws": True},
    {"grad_sample_mode": "bk", "n": 8, "batch_size": 2, "empty_draws": True},
]
CONFIGS = [c for c in CONFIGS if c["grad_sample_mode"] in get_registry().names("grad_sampler")]

#: noisy runs (test_noise_and_resume.py)
SIGMA, CLIP, N, BATCH = 1.3, 0.7, 40, 20
NOISE_SPEC = {
    "zero_gradients": True,  # the clipped sums are 0: p.grad after a step is noise / (qN)
    "noise_multiplier": SIGMA,
    "max_grad_norm": CLIP,
    "d_in": 300,  # 1,523 parameters
    "n": N,
    "batch_size": BATCH,
    "steps": 4,
    "lr": 0.0,
}
#: correlated noise: rank 0's mechanism keeps the noise history, the others never draw
BANDMF_SPEC = {
    **NOISE_SPEC,
    "noise": {"name": "bandmf", "bands": 2},
    "sampler": "cyclic_poisson",
    "batch_size": 10,
}
RESUME_SPEC = {
    "noise_multiplier": 0.8,
    "clipping": "adaptive",
    "max_grad_norm": 0.3,
    "steps": 7,  # four steps per epoch: the run crosses an epoch boundary
}
#: every noisy run of the shared process group, by name
NOISE_RUNS = {
    "noise": NOISE_SPEC,
    "same": {**NOISE_SPEC, "faulty_noise": "same"},
    "independent": {**NOISE_SPEC, "faulty_noise": "independent"},
    "straight": RESUME_SPEC,
    "bandmf": BANDMF_SPEC,
}
