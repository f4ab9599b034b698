"""Frozen training with the frozen-prefix feature cache vs live, side by side in one run.

    python bench/bench_feature_cache.py [--episodes 24] [--steps 40]

Trains configs/builtin_frozen.yaml (window 8, chunk 10, batch 16, 96x96) on simulated episodes
twice with the same seed and number of steps — ``data.feature_cache`` on and off — and prints
samples/s after 3 warm-up steps (the cache is built before training; its build time is printed
too), and the validation loss after the same number of steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=24)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    mvla = [sys.executable, "-m", "mobile_vla.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run(
            [
                *mvla,
                "collect",
                "--out",
                str(data),
                "--episodes",
                str(args.episodes),
                "--workers",
                "2",
                "-q",
                "--sim.image_size=[96,96]",
            ],
            check=True,
            capture_output=True,
        )
        results = {}
        for flag in ("true", "false"):
            t0 = time.perf_counter()
            subprocess.run(
                [
                    *mvla,
                    "train",
                    str(ROOT / "configs" / "builtin_frozen.yaml"),
                    "-q",
                    f"--data.path={data}",
                    f"--data.feature_cache={flag}",
                    f"--trainer.output_dir={tmp}",
                    f"--trainer.run_name=fc-{flag}",
                    f"--trainer.max_steps={args.steps}",
                    "--trainer.max_epochs=100",
                    "--trainer.limit_val_batches=1.0",
                ],
                check=True,
                capture_output=True,
            )
            wall = time.perf_counter() - t0
            run = Path(tmp) / f"fc-{flag}"
            stats = json.loads((run / "train_stats.json").read_text())
            rows = [r.split(",") for r in (run / "logs/csv/metrics.csv").read_text().splitlines()]
            val = [float(r[-1]) for r in rows[1:] if r and r[-1]]
            results[flag] = (stats, wall, val[-1] if val else float("nan"))
        print(
            f"frozen training, builtin backbone, window 8, chunk 10, batch 16, {args.steps} "
            f"steps, {args.episodes} episodes (samples/s after 3 warm-up steps):"
        )
        for flag, name in (("true", "cached prefix"), ("false", "live backbone")):
            stats, wall, val = results[flag]
            print(
                f"  {name:<14} {stats['train_samples_per_s']:8.1f} samples/s   val_loss "
                f"{val:.5f}   wall {wall:5.1f} s (with start-up and cache build)"
            )
        ratio = (
            results["true"][0]["train_samples_per_s"] / results["false"][0]["train_samples_per_s"]
        )
        diff = abs(results["true"][2] - results["false"][2]) / results["false"][2]
        print(f"  ratio {ratio:.1f}x; validation loss differs by {diff:.2%}")


if __name__ == "__main__":
    main()
