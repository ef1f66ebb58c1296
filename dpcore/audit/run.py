"""A short synthetic white-box audit of the plugin combination a config selects.

The audited run is the real pipeline (``PrivacyEngine.from_config(config)`` and its
``make_private``), on a model and data chosen so that the canaries' scores are
readable: bias-free ``nn.Linear`` maps (one per clipping bound when ``max_grad_norm``
is a list) with at least two weights per canary, and a
small data set of zero inputs, whose per-sample gradients are exactly zero. The
grad sampler still processes every real batch; the canaries enter through
:class:`~dpcore.audit.canaries.CanaryAudit` like in any training run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..config import EngineConfig
from ..errors import ConfigError
from .canaries import CanaryAudit
from .report import AuditReport

#: zero-input examples per expected batch of real data
REAL_BATCH = 4
INPUT_FEATURES = 64


class _Probe(nn.Module):
    """Bias-free linear maps of the same input, summed: with zero inputs every per-sample
    gradient is exactly zero."""

    def __init__(self, layers: int, out_features: int) -> None:
        super().__init__()
        self.maps = nn.ModuleList(
            nn.Linear(INPUT_FEATURES, out_features, bias=False) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.maps]).sum(0)


def run_audit(
    config: EngineConfig | Mapping[str, Any],
    *,
    canaries: int = 1000,
    steps: int = 100,
    sample_rate: float = 0.1,
    alpha: float = 0.05,
    selection: str = "grid",
    seed: int | None = None,
) -> AuditReport:
    """Audit ``config``'s grad sampler, clipper, noise, sampler and accountant.

    The claim audited is the engine's own epsilon after ``steps`` steps at (about)
    ``sample_rate``: with ``noise_multiplier`` in the config that noise is used; with
    ``target_epsilon`` the engine calibrates the noise to spend it over the audit's
    steps. ``seed`` overrides the config's seed (which otherwise seeds everything).
    """
    from ..engine import PrivacyEngine

    cfg = config if isinstance(config, EngineConfig) else EngineConfig.from_dict(config)
    if int(steps) < 1:
        raise ConfigError(f"audit: steps must be at least 1, got {steps}")
    if int(canaries) < 2:
        raise ConfigError(f"audit: at least 2 canaries are needed, got {canaries}")
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"audit: sample_rate must be in (0, 1], got {sample_rate}")
    if not 0 < alpha < 0.5:
        raise ConfigError(f"audit: alpha must be in (0, 0.5), got {alpha}")
    if selection not in ("grid", "split"):
        raise ConfigError(f"audit: selection must be 'grid' or 'split', got {selection!r}")
    batches_per_epoch = max(1, round(1.0 / sample_rate))
    updates: dict[str, Any] = {}
    if seed is not None:
        updates["seed"] = seed
    elif cfg.seed is None:
        from ..rng import fresh_seed

        updates["seed"] = fresh_seed()
    if cfg.noise_multiplier is None:
        updates["epochs"] = steps / batches_per_epoch
    cfg = cfg.model_copy(update=updates)

    # one weight matrix per clipping bound, so per-layer bounds given as a list apply
    layers = len(cfg.max_grad_norm) if isinstance(cfg.max_grad_norm, list) else 1
    out_features = max(1, math.ceil(2 * canaries / (INPUT_FEATURES * layers)))
    model = _Probe(layers, out_features)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    n = REAL_BATCH * batches_per_epoch
    data = TensorDataset(torch.zeros(n, INPUT_FEATURES), torch.zeros(n, out_features))
    loader = DataLoader(data, batch_size=REAL_BATCH)

    engine = PrivacyEngine.from_config(cfg)
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader
    )
    audit = CanaryAudit(engine, canaries, alpha=alpha, selection=selection, synthetic=True).attach()
    try:
        taken = 0
        while taken < steps:
            for x, y in private_loader:
                private_optimizer.zero_grad()
                if x.shape[0] > 0:  # an empty data batch still carries its canaries
                    out = private_model(x)
                    loss = ((out - y) ** 2).sum(dim=1)
                    (loss.mean() if cfg.loss_reduction == "mean" else loss.sum()).backward()
                private_optimizer.step()
                taken += 1
                if taken == steps:
                    break
        return audit.report()
    finally:
        audit.detach()
        engine.detach()
