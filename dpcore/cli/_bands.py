"""``dpcore noise --bands B`` and ``dpcore noise --choose-bands`` (BandMF).

BandMF with ``b`` bands and cyclic Poisson sampling over ``b`` groups spends what
DP-SGD spends with ``ceil(n / b)`` steps at rate ``b q``; see
``docs/correlated-noise.md``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import typer
from rich.table import Table

from ._common import console


def bands_event(sample_rate: float, steps: int, bands: int) -> tuple[float, int]:
    """(rate, steps) of the DP-SGD event BandMF with ``bands`` bands reduces to."""
    from ..errors import ConfigError

    if bands < 1:
        raise ConfigError(f"--bands must be >= 1, got {bands}")
    rate = sample_rate * bands
    if rate > 1 + 1e-12:
        raise ConfigError(
            f"--bands {bands} x sample rate {sample_rate:g} = {rate:g} > 1: with cyclic Poisson "
            f"sampling each of the {bands} groups would have to supply the whole expected batch; "
            f"use at most {math.floor(1 / sample_rate + 1e-9)} bands"
        )
    return min(rate, 1.0), math.ceil(steps / bands)


def choose_bands_report(
    *,
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str,
    tolerance: float,
    options: dict[str, Any] | None = None,
    coefs: str = "sqrt",
) -> dict[str, Any]:
    """What ``dpcore noise --choose-bands`` prints: one row per candidate, and the best."""
    from ..correlated import choose_bands_for_rate

    choice = choose_bands_for_rate(
        target_epsilon,
        delta,
        sample_rate,
        steps,
        coefs=coefs,  # type: ignore[arg-type]
        accountant=accountant,
        epsilon_tolerance=tolerance,
        accountant_options=options,
    )
    rows = [
        {
            "bands": r.bands,
            "sample_rate": r.sample_rate,
            "accounted_steps": r.accounted_steps,
            "noise_multiplier": r.noise_multiplier,
            "prefix_rmse": r.prefix_rmse,
            "relative_error": r.relative_error,
        }
        for r in choice.candidates
    ]
    return {
        "target_epsilon": float(target_epsilon),
        "delta": delta,
        "sample_rate": sample_rate,
        "steps": steps,
        "accountant": accountant,
        "coefs": coefs,
        "candidates": rows,
        "best_bands": choice.best.bands,
    }


def emit_choose_bands(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table(
        title=(
            f"BandMF vs DP-SGD at epsilon={report['target_epsilon']:g}, "
            f"delta={report['delta']:g}, q={report['sample_rate']:g}, {report['steps']} steps"
        )
    )
    for header in ("bands", "rate b·q", "accounted steps", "sigma", "prefix RMSE", "vs DP-SGD"):
        table.add_column(header, justify="right")
    for row in report["candidates"]:
        best = row["bands"] == report["best_bands"]
        table.add_row(
            str(row["bands"]) + (" *" if best else ""),
            f"{row['sample_rate']:.4g}",
            str(row["accounted_steps"]),
            f"{row['noise_multiplier']:.4g}",
            f"{row['prefix_rmse']:.4g}",
            f"{row['relative_error']:.3f}",
            style="bold" if best else None,
        )
    console.print(table)
    best = report["best_bands"]
    if best == 1:
        advice = "plain DP-SGD (noise = gaussian, sampler = poisson): correlation does not pay here"
    else:
        advice = (
            f'noise = {{name = "bandmf", bands = {best}}}, sampler = {{name = "cyclic_poisson"}}'
        )
    console.print(
        f"best: bands = {best}, {advice}. Prefix RMSE: expected RMS noise of the running sums "
        "of the noisy gradients, per coordinate, in units of the clipping bound."
    )
