"""What LoRA (Case 4) learns in the same wall-clock time, before and after the fast path.

    python bench/bench_time_to_quality.py [--data D] [--scenes 48] [--seed 101]
        [--before-steps 240] [--after-steps 480] [--points 4]

Throughput ratios (``bench_strategies.py``) say how many windows a second each path trains;
this says what the seconds buy. Two arms train LoRA on every fusion layer of the built-in
backbone on the same collection ``D`` (96x96, the same split; default: 480 episodes collected
first, as ``make demo`` does), keeping ``--points`` step checkpoints; every checkpoint then
drives the same held-out scenes (``mobile-vla curve``, simulator seed ``--seed``, not a
training seed) and predicts the chunk after every frame of the test split (``mobile-vla eval
--episodes 0``: the same targets for both arms, each with its own history), and is placed at
the seconds its run had taken when it was saved (the checkpoint's files against the process
start: start-up, cache build and validation included).

* before: ``configs/builtin_lora.yaml`` as the issue found it: live backbone, fp32, one
  window of 8 frames per sample, batches of 16 windows.
* after: ``configs/builtin_lora_per_step.yaml``: the same strategy and learning rates with the
  chunk after every frame supervised (``head.per_step``, 24-frame windows from the episode's
  first frame, batches of 4), bfloat16 autocast where the CPU multiplies it natively and the
  vision tower and sentence encoder read from the feature cache.

Both snap the command to the teleop keys at 0.5 (``head.snap_to_keys``), as the driving
recipe does. Each arm runs alone (2 cores); the machine should be otherwise idle.
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

ARMS = {  # name: (config, overrides)
    "before": ("builtin_lora.yaml", ["--data.feature_cache=false"]),
    "after": ("builtin_lora_per_step.yaml", ["--data.feature_cache=true"]),
}


def checkpoint_seconds(folder: Path, start: float) -> float:
    """Seconds from the run's start to the last file written into a checkpoint."""
    return max(p.stat().st_mtime for p in folder.rglob("*") if p.is_file()) - start


def run_arm(
    name: str,
    config: str,
    extra: list[str],
    data: Path,
    out: Path,
    steps: int,
    points: int,
    scenes: int,
    seed: int,
) -> list[dict]:
    every = max(steps // points, 1)
    marks = [every * i for i in range(1, points) if every * i < steps]
    cmd = [
        *MOBILE_VLA,
        "train",
        str(ROOT / "configs" / config),
        "-q",
        f"--data.path={data}",
        "--sim.image_size=[96,96]",
        "--head.snap_to_keys=0.5",
        "--trainer.max_epochs=10000",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_every_n_steps={every}",
        "--trainer.limit_val_batches=8",
        f"--trainer.checkpoint_steps=[{','.join(map(str, marks))}]",
        f"--trainer.output_dir={out}",
        f"--trainer.run_name={name}",
        *extra,
    ]
    start = time.time()
    subprocess.run(cmd, check=True)
    run = out / name
    stats = json.loads((run / "train_stats.json").read_text())
    curve = subprocess.run(
        [*MOBILE_VLA, "curve", str(run), "--episodes", str(scenes), "--seed", str(seed), "-q"],
        check=True,
        capture_output=True,
        text=True,
    )
    print(curve.stdout.strip())
    rows = json.loads((run / "metrics.json").read_text())["curve"]["points"]
    for row in rows:
        folder = run / "checkpoints" / row["checkpoint"]
        row["seconds"] = checkpoint_seconds(folder, start)
        ck = ["--checkpoint", row["checkpoint"], "--episodes", "0", "-q"]
        subprocess.run([*MOBILE_VLA, "eval", str(run), *ck], check=True, capture_output=True)
        row["offline"] = json.loads((run / "metrics.json").read_text())["offline"]
    rate = stats["train_windows_per_s"]  # None when no step came after the warm-up ones
    print(
        f"  {name}: {'-' if rate is None else f'{rate:.1f}'} supervised windows/s (loop), peak RSS "
        f"{stats['peak_memory_bytes'] / 2**30:.2f} GiB, precision {stats['precision']}, "
        f"{stats.get('feature_cache', '')}"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a 96x96 collection (default: collect 480)")
    parser.add_argument("--scenes", type=int, default=48)
    parser.add_argument("--seed", type=int, default=101)
    parser.add_argument("--before-steps", type=int, default=240)
    parser.add_argument("--after-steps", type=int, default=480)
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temp folder)")
    args = parser.parse_args()
    print(machine())
    steps = {"before": args.before_steps, "after": args.after_steps}
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        data = args.data or collect_episodes(Path(tmp) / "data", 480)
        table = {}
        for name, (config, extra) in ARMS.items():
            table[name] = run_arm(
                name, config, extra, data, out, steps[name], args.points, args.scenes, args.seed
            )
    print(
        f"\nagainst seconds: closed-loop success on {args.scenes} scenes of seed {args.seed}; "
        "test-split loss and direction accuracy (sign of linear_y where |linear_y| > 0.1)"
    )
    head = f"{'step':>6} {'seconds':>8} {'success':>9} {'test loss':>10} {'dir acc':>8}"
    print(f"  {'arm':<7} {head}  by side")
    for name, rows in table.items():
        for r in rows:
            sides = r["by_side"]
            lr = ", ".join(f"{k} {v['successes']}/{v['episodes']}" for k, v in sides.items())
            off = r["offline"]
            print(
                f"  {name:<7} {r['step']:>6} {r['seconds']:>8.0f} "
                f"{r['successes']:>4}/{r['episodes']:<4} {off['val_loss']:>10.4f} "
                f"{off['direction_accuracy']['value']:>8.3f}  {lr}"
            )


if __name__ == "__main__":
    sys.exit(main())
