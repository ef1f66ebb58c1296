"""``adaptive``: the clipping bound follows a quantile of the gradient norms.

Andrew, Thakkar, McMahan, Ramaswamy (NeurIPS 2021), "Differentially private
learning with adaptive clipping". After each step the bound moves geometrically,
``C ← C · exp(-η (b̃ - γ))``, towards the bound that leaves a fraction γ of the
samples unclipped, where b̃ is a *privatised* fraction of unclipped samples:
``Σ_i (1[‖g_i‖ ≤ C] - ½)`` has sensitivity ½ and gets Gaussian noise of std σ_b.

Releasing that count costs privacy. So that the whole step is still one Gaussian
mechanism with the configured σ (the one the accountant sees), the gradient
noise multiplier is raised to ``σ_Δ = (σ⁻² - (2σ_b)⁻²)^(-1/2)`` (Theorem 1 of the
paper): the two releases compose to exactly σ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from dpcore import rng
from dpcore.errors import ConfigError

from ._common import EPS, single_bound, total_norms

#: default σ_b as a multiple of σ: the gradient noise then grows by only 0.5%
DEFAULT_COUNT_NOISE_RATIO = 5.0


class AdaptiveOptions(BaseModel):
    """Options of the ``adaptive`` clipper."""

    model_config = ConfigDict(extra="forbid")

    target_unclipped_quantile: float = Field(
        default=0.5, gt=0, lt=1, description="γ: fraction of samples to leave unclipped"
    )
    clipbound_learning_rate: float = Field(
        default=0.2, gt=0, description="η of the geometric update"
    )
    count_noise_std: float | None = Field(
        default=None,
        gt=0,
        description="σ_b, std of the noise on the unclipped count; default 5σ (must exceed σ/2)",
    )
    min_clipbound: float = Field(default=1e-6, gt=0, description="lower limit of the bound")
    max_clipbound: float = Field(default=1e6, gt=0, description="upper limit of the bound")


class AdaptiveClipper:
    """Flat clipping with a bound that tracks the γ-quantile of the norms, privately."""

    def __init__(
        self,
        *,
        max_grad_norm: float | Sequence[float],
        parameter_names: Sequence[str],
        target_unclipped_quantile: float = 0.5,
        clipbound_learning_rate: float = 0.2,
        count_noise_std: float | None = None,
        min_clipbound: float = 1e-6,
        max_clipbound: float = 1e6,
    ) -> None:
        if min_clipbound > max_clipbound:
            raise ConfigError("adaptive clipper: min_clipbound exceeds max_clipbound")
        self.max_grad_norm = single_bound(max_grad_norm, "adaptive")
        self.target_unclipped_quantile = float(target_unclipped_quantile)
        self.clipbound_learning_rate = float(clipbound_learning_rate)
        self.count_noise_std_option = count_noise_std
        self.min_clipbound = float(min_clipbound)
        self.max_clipbound = float(max_clipbound)
        self.parameter_names = list(parameter_names)
        self.noise_multiplier: float | None = None
        # Σ_i (1[‖g_i‖ ≤ C] - ½) over the backward passes of the current step
        self._centred_count = torch.zeros((), dtype=torch.float64)
        #: privatised unclipped fraction b̃ of the last step (for logging)
        self.last_unclipped_fraction: float | None = None

    # -- noise -------------------------------------------------------------------
    def count_noise_std(self) -> float:
        if self.count_noise_std_option is not None:
            return float(self.count_noise_std_option)
        return DEFAULT_COUNT_NOISE_RATIO * (self.noise_multiplier or 0.0)

    def gradient_noise_multiplier(self, noise_multiplier: float) -> float:
        self.noise_multiplier = float(noise_multiplier)
        sigma = self.noise_multiplier
        if sigma == 0:
            return 0.0
        sigma_b = self.count_noise_std()
        if not 2 * sigma_b > sigma:
            raise ConfigError(
                f"adaptive clipper: count_noise_std={sigma_b} must exceed noise_multiplier/2 = "
                f"{sigma / 2} for the count and the gradient to share the budget; raise it "
                "(default: 5 × noise_multiplier)."
            )
        return (sigma**-2 - (2 * sigma_b) ** -2) ** -0.5

    def sensitivity(self) -> float:
        return self.max_grad_norm

    # -- clipping ------------------------------------------------------------------
    def clip_factors(self, sq_norms: Mapping[str, Tensor]) -> dict[str, Tensor]:
        norms = total_norms(sq_norms)
        unclipped = (norms <= self.max_grad_norm).to(torch.float64)
        self._centred_count = self._centred_count + (unclipped - 0.5).sum().cpu()
        factor = (self.max_grad_norm / (norms + EPS)).clamp(max=1.0)
        return {name: factor for name in sq_norms}

    def all_reduce_statistics(self, reduce: Callable[[Tensor], None]) -> None:
        """Sum the count over ranks (the DP optimizer calls this when distributed)."""
        reduce(self._centred_count)

    def end_step(self, *, expected_batch_size: float, generator: torch.Generator | None) -> None:
        sigma_b = self.count_noise_std() if self.noise_multiplier else 0.0
        z = rng.standard_normal((1,), generator=generator).double()[0]
        noisy = float(self._centred_count) + sigma_b * float(z)
        fraction = (noisy + expected_batch_size / 2) / expected_batch_size
        self.last_unclipped_fraction = fraction
        updated = self.max_grad_norm * math.exp(
            -self.clipbound_learning_rate * (fraction - self.target_unclipped_quantile)
        )
        self.max_grad_norm = min(max(updated, self.min_clipbound), self.max_clipbound)
        self._centred_count = torch.zeros((), dtype=torch.float64)

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"max_grad_norm": self.max_grad_norm, "centred_count": float(self._centred_count)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.max_grad_norm = float(state["max_grad_norm"])
        self._centred_count = torch.tensor(
            float(state.get("centred_count", 0.0)), dtype=torch.float64
        )
