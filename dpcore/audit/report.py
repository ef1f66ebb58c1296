"""The result of an audit, as plain data that serialises to JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Verdict = Literal["pass", "fail"]


@dataclass
class AuditReport:
    """What one audit measured, and whether the pipeline kept its claim.

    The verdict is ``"fail"`` when the one-run lower bound exceeds the claimed
    epsilon, when ``mu_hat`` is further than ``mu_tolerance`` from ``mu_expected``, or
    when a canary's clipped contribution exceeded the clipper's sensitivity;
    ``reasons`` says which. The f-DP bound is reported but does not decide the
    verdict: it tests Gaussian trade-off curves, and a subsampled mechanism's curve
    is not Gaussian (see ``docs/auditing.md``).
    """

    claimed_epsilon: float
    delta: float
    alpha: float
    canaries: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    epsilon_lower_bound_fdp: float
    mu_hat: float
    mu_expected: float
    seed: int
    verdict: Verdict
    # -- details -------------------------------------------------------------------
    mu_tolerance: float = math.nan
    mu_lower_bound_fdp: float = 0.0
    guesses_in: int = 0
    guesses_out: int = 0
    selection: str = "grid"
    canaries_in: int = 0
    steps: int = 0
    sample_rate: float = math.nan
    noise_multiplier: float = math.nan
    max_contribution: float = 0.0
    sensitivity: float = math.nan
    epsilon_ceiling: float = math.nan
    plugins: dict[str, str] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def to_dict(self) -> dict[str, Any]:
        """Plain data; non-finite numbers become ``None`` so the JSON stays standard."""
        return {k: _finite(v) for k, v in asdict(self).items()}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditReport:
        values: dict[str, Any] = {
            k: (math.nan if v is None and k in _FLOAT_FIELDS else v) for k, v in data.items()
        }
        return cls(**values)


_FLOAT_FIELDS = {
    name for name, f in AuditReport.__dataclass_fields__.items() if f.type in ("float", float)
}


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def build_report(
    canaries: Any,
    *,
    claimed_epsilon: float,
    delta: float,
    alpha: float,
    selection: str,
    rate_per_step: float,
    coefs: list[float],
    noise_multiplier: float,
    sensitivity: float,
    plugins: dict[str, str],
    false_alarm: float = 1e-3,
    two_sided: bool = True,
) -> AuditReport:
    """Bounds, calibration and verdict from the scores of an audited run.

    ``two_sided=False`` (real data) fails the calibration check only when the canaries
    stand out *more* than the configured noise allows."""
    import numpy as np

    from . import estimators as E
    from .canaries import effective_contributions

    scores, included = canaries.scores, canaries.included
    seed = int(canaries.seed)
    rule: Any = selection
    one_run = E.audit_scores(scores, included, alpha=alpha, delta=delta, selection=rule, seed=seed)
    fdp = E.audit_scores(
        scores, included, alpha=alpha, delta=delta, selection=rule, seed=seed, fdp=True
    )
    n_in = int(np.sum(included))
    if min(n_in, len(included) - n_in) >= 2:
        calibration = E.calibrate(scores, included)
    else:  # too few canaries on one side to estimate a spread
        calibration = E.Calibration(math.nan, math.nan, n_in, len(included) - n_in, math.nan)
    mu_expected = E.expected_mu(
        effective_contributions(canaries, coefs), np.asarray(canaries.noise_stds), rate_per_step
    )
    if math.isfinite(mu_expected) and math.isfinite(calibration.variance_ratio):
        mu_tolerance = E.tolerance(calibration.standard_error_at(mu_expected), false_alarm)
    else:
        mu_tolerance = 0.0
    if selection == "split":  # the test runs on the second half at level alpha
        half = canaries.count - canaries.count // 2
        ceiling = E.perfect_guessing_ceiling(half, half, alpha, delta)
    else:
        grid_size = len({E._split_counts(canaries.count, f) for f in E.DEFAULT_GRID})
        ceiling = E.perfect_guessing_ceiling(
            canaries.count, canaries.count, alpha / grid_size, delta
        )

    reasons: list[str] = []
    if one_run.epsilon > claimed_epsilon:
        reasons.append(
            f"the lower bound {one_run.epsilon:.3f} exceeds the claimed epsilon "
            f"{claimed_epsilon:.3f}: the pipeline leaks more than its accounting states"
        )
    gap = calibration.mu_hat - mu_expected
    # without noise (sigma = 0) nothing is expected of the separation: the claim is infinite
    calibrated = math.isfinite(mu_expected) and not math.isnan(calibration.mu_hat)
    if calibrated and not (gap <= mu_tolerance and (gap >= -mu_tolerance or not two_sided)):
        direction = "more" if gap > 0 else "less"
        reasons.append(
            f"mu_hat = {calibration.mu_hat:.3f} is outside {mu_expected:.3f} ± {mu_tolerance:.3f}: "
            f"the canaries stand out {direction} than the configured noise, sampling rate and "
            "clipping allow (noise of the wrong scale, or a sampler including examples at "
            "another rate)"
        )
    if canaries.max_contribution > canaries.sensitivity_at_max * (1 + 1e-5):
        reasons.append(
            f"a canary's clipped contribution had norm {canaries.max_contribution:.4g}, above the "
            f"clipper's sensitivity {canaries.sensitivity_at_max:.4g}: the clipper does not clip"
        )
    return AuditReport(
        claimed_epsilon=claimed_epsilon,
        delta=delta,
        alpha=alpha,
        canaries=canaries.count,
        guesses=one_run.guesses,
        correct=one_run.correct,
        epsilon_lower_bound=one_run.epsilon,
        epsilon_lower_bound_fdp=fdp.epsilon,
        mu_hat=calibration.mu_hat,
        mu_expected=mu_expected,
        seed=seed,
        verdict="fail" if reasons else "pass",
        mu_tolerance=mu_tolerance,
        mu_lower_bound_fdp=float(fdp.mu or 0.0),
        guesses_in=one_run.guesses_in,
        guesses_out=one_run.guesses_out,
        selection=selection,
        canaries_in=int(np.sum(included)),
        steps=len(canaries.noise_stds),
        sample_rate=rate_per_step,
        noise_multiplier=noise_multiplier,
        max_contribution=float(canaries.max_contribution),
        sensitivity=sensitivity,
        epsilon_ceiling=ceiling,
        plugins=dict(plugins),
        reasons=reasons,
    )
