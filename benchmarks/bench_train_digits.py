"""Wall time, test accuracy and epsilon of `dpcore train` with no arguments (the
README's quick start): the bar is >= 85% test accuracy at epsilon <= 3 (delta 1e-5) in
under 3 minutes on a 2-core CPU.

    python benchmarks/bench_train_digits.py [--runs 3]

Times the whole command (process start, imports, noise calibration, training,
evaluation, checkpoints) in a fresh process, as a user would see it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BAR_ACCURACY, BAR_EPSILON, BAR_SECONDS = 0.85, 3.0, 180.0


def one_run() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "dpcore", "train", "--run-dir", str(run_dir), "--no-progress"],
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(proc.stdout + proc.stderr)
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        last = [r for r in map(json.loads, lines) if "epoch" in r][-1]
    return {
        "wall_s": round(wall, 1),
        "test_accuracy": last["test_accuracy"],
        "epsilon": round(last["epsilon"], 4),
        "delta": last["delta"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    for _ in range(args.runs):
        r = one_run()
        ok = (
            r["test_accuracy"] >= BAR_ACCURACY
            and r["epsilon"] <= BAR_EPSILON
            and r["wall_s"] < BAR_SECONDS
        )
        print(json.dumps({**r, "meets_bar": ok}))


if __name__ == "__main__":
    main()
