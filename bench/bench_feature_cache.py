"""Frozen training with the frozen-prefix feature cache vs live, side by side in one run.

    python bench/bench_feature_cache.py [--episodes 24] [--steps 40]

Trains configs/builtin_frozen.yaml (window 8, chunk 10, batch 16, 96x96) on simulated episodes
twice with the same seed and number of steps — ``data.feature_cache`` on and off — and prints
samples/s after 3 warm-up steps (the cache is built before training; its build time is printed
too) for the training loop (batch fetch and collate included: what wall-clock training gets)
and for the step alone, and the validation loss after the same number of steps.

Then LoRA (configs/builtin_lora.yaml, same window, chunk and batch): what a frozen-vision cache
could save. In one process, on the same batches: the time of a LoRA training step, and of the
part a vision cache would remove (the frozen ViT + projector forward of the batch's frames);
the bound on the speed-up is step / (step - vision).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import MOBILE_VLA, ROOT, collect_episodes, machine

sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=24)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    print(machine())
    mvla = MOBILE_VLA
    with tempfile.TemporaryDirectory() as tmp:
        data = collect_episodes(Path(tmp) / "data", args.episodes)
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
            f"steps, {args.episodes} episodes (samples/s after 3 warm-up steps; loop: batch "
            "fetch + step, step: forward + backward + optimizer):"
        )
        for flag, name in (("true", "cached prefix"), ("false", "live backbone")):
            stats, wall, val = results[flag]
            print(
                f"  {name:<14} loop {stats['train_samples_per_s']:6.1f} samples/s   step "
                f"{stats['train_step_samples_per_s']:6.1f} samples/s   val_loss {val:.5f}   "
                f"wall {wall:5.1f} s (with start-up and cache build)"
            )
        cached, live = results["true"][0], results["false"][0]
        loop = cached["train_samples_per_s"] / live["train_samples_per_s"]
        step = cached["train_step_samples_per_s"] / live["train_step_samples_per_s"]
        diff = abs(results["true"][2] - results["false"][2]) / results["false"][2]
        print(
            f"  ratio {loop:.1f}x (loop), {step:.1f}x (step); validation loss differs by {diff:.2%}"
        )
        lora_vision_share(data, args.steps)


def lora_vision_share(data: Path, steps: int) -> None:
    """LoRA step time vs the frozen vision forward inside it, on the same real batches
    (bench_vision_share.py's measurement, on the simulated episodes)."""
    from bench_vision_share import batches_of, build, measure, report

    n = min(steps, 20)
    _, policy, plan, bundle = build("builtin", data, 16, "cpu")
    step, vision, frames = measure(policy, plan, batches_of(bundle, 16, n), "cpu", False)
    report("builtin backbone, cpu, fp32", 16, n, step, vision, frames)


if __name__ == "__main__":
    main()
