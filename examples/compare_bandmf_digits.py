"""Digits: BandMF (correlated noise) vs Gaussian DP-SGD at the same epsilon, over seeds.

    python examples/compare_bandmf_digits.py [--seeds 5] [--jobs 4] [--config PATH]

Trains the config (``examples/digits-bandmf.toml`` by default) once per seed, and the
same config with ``noise = gaussian`` and ``sampler = poisson`` (plain DP-SGD), both
calibrated to the same ``target_epsilon``; prints the mean and standard deviation of
the test accuracy of each. Extra ``--set key=value`` pairs override [train] entries
(e.g. ``--set lr=0.5``).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def run_one(config: dict[str, Any], seed: int) -> dict[str, Any]:
    import torch
    from rich.console import Console

    from dpcore.train import train

    torch.set_num_threads(1)
    cfg = json.loads(json.dumps(config))
    cfg["seed"] = seed
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(cfg, run_dir=run_dir, console=Console(file=io.StringIO()), progress=False)
    return {
        "seed": seed,
        "noise": cfg["noise"]["name"],
        "accuracy": result.test_accuracy,
        "epsilon": result.epsilon,
        "noise_multiplier": result.engine.noise_multiplier,
        "steps": result.steps,
    }


def variants(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    gaussian = dict(config, noise={"name": "gaussian"}, sampler={"name": "poisson"})
    return {"bandmf": config, "gaussian": gaussian}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=HERE / "digits-bandmf.toml")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, help="also write every run's result here")
    args = parser.parse_args()

    from dpcore.config import load_toml

    config = load_toml(args.config)
    for pair in args.set:
        key, _, value = pair.partition("=")
        config["train"][key] = json.loads(value)
    tasks = [
        (name, cfg, seed) for name, cfg in variants(config).items() for seed in range(args.seeds)
    ]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [(name, pool.submit(run_one, cfg, seed)) for name, cfg, seed in tasks]
        results = [(name, f.result()) for name, f in futures]

    print(
        f"digits, target epsilon {config['target_epsilon']}, {args.seeds} seeds, "
        f"[train] {json.dumps(config['train'])}"
    )
    for name in ("gaussian", "bandmf"):
        runs = [r for n, r in results if n == name]
        accs = [r["accuracy"] for r in runs]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(
            f"  {name:9s} noise {config['noise'] if name == 'bandmf' else {'name': 'gaussian'}}"
            f"  sigma {runs[0]['noise_multiplier']:.3f}  epsilon {runs[0]['epsilon']:.3f}"
            f"  accuracy {statistics.mean(accs):.4f} ± {spread:.4f}"
            f"  (min {min(accs):.4f}, max {max(accs):.4f})"
        )
    if args.json:
        args.json.write_text(json.dumps([r for _, r in results], indent=2))


if __name__ == "__main__":
    main()
