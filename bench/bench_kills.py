"""A kill campaign: ``kill -9`` a training at random moments, resume it, and check that it ends
where the uninterrupted run ends.

One reference run trains ``--steps`` optimizer steps; the campaign runs the same config with
the same seed and SIGKILLs it after a random delay (uniform in [--min-delay, --max-delay]
seconds after start-up) ``--kills`` times, each time continuing with ``train --resume`` (or
from scratch, as the CLI's message says, when it died before its first checkpoint). It prints
the kills delivered, how many left a checkpoint to resume from, the step the run ended at
against the reference, and the largest weight difference.

    python bench/bench_kills.py [--kills 20] [--steps 40000] [--min-delay 12] [--max-delay 30]

The tiny model trains ~100 steps/s here after a ~10 s start-up, so each attempt advances about
(delay - 10 s) x 100 steps: the steps must outlast the kills (20 kills ~ 20,000 steps).
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MOBILE_VLA, ROOT, collect_episodes, machine

TINY = [
    "--data.image_size=[32,32]",
    "--data.window_size=3",
    "--data.fwd_pred_next_n=4",
    "--data.val_fraction=0.25",
    "--head.hidden_size=32",
    "--head.num_layers=1",
    "--trainer.batch_size=8",
    "--trainer.max_epochs=1000",
    "--backbone.builtin.image_size=32",
    "--backbone.builtin.patch_size=8",
    "--backbone.builtin.vision_width=32",
    "--backbone.builtin.vision_layers=2",
    "--backbone.builtin.vision_heads=2",
    "--backbone.builtin.fusion_width=32",
    "--backbone.builtin.fusion_layers=3",
    "--backbone.builtin.fusion_heads=2",
    "--backbone.pretrained=false",
    "--train_setup.learning_rate=0.003",
]


def train_args(data: Path, out: Path, name: str, steps: int) -> list[str]:
    return [
        *MOBILE_VLA,
        "train",
        str(ROOT / "configs" / "builtin_frozen.yaml"),
        f"--data.path={data}",
        f"--data.cache_dir={out / 'cache'}",
        f"--trainer.output_dir={out / 'runs'}",
        f"--trainer.run_name={name}",
        f"--trainer.max_steps={steps}",
        *TINY,
        "-q",
    ]


def weights(run: Path) -> dict:
    from mobile_vla.training.checkpoint import load_folder

    return load_folder(run / "checkpoints" / "last")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=40000)
    ap.add_argument("--min-delay", type=float, default=12.0)
    ap.add_argument("--max-delay", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = collect_episodes(tmp / "data", 24, size=32)
        t0 = time.perf_counter()
        subprocess.run(train_args(data, tmp, "whole", args.steps), check=True, capture_output=True)
        whole_s = time.perf_counter() - t0
        print(f"reference run: {args.steps} steps in {whole_s:.0f} s")
        run = tmp / "runs" / "cut"
        kills = resumed = restarted = 0
        while kills < args.kills:
            resume = (run / "checkpoints" / "last").exists()
            cmd = (
                [*MOBILE_VLA, "train", "--resume", str(run), "-q"]
                if resume
                else train_args(data, tmp, "cut", args.steps)
            )
            if not resume and run.exists():
                restarted += 1
                import shutil

                shutil.rmtree(run)
            elif resume:
                resumed += 1
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            delay = rng.uniform(args.min_delay, args.max_delay)
            try:
                proc.wait(timeout=delay)
                if proc.returncode != 0:
                    print(proc.stderr.read().decode()[-500:] if proc.stderr else "")
                    raise SystemExit(f"training exited {proc.returncode} before the kill")
                break  # finished before the kill came: the campaign ends early
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
        final = [*MOBILE_VLA, "train", "--resume", str(run), "-q"]
        if (run / "checkpoints" / "last").exists():
            resumed += 1
            subprocess.run(final, check=True, capture_output=True)
        else:
            subprocess.run(train_args(data, tmp, "cut", args.steps), check=True)
        a, b = weights(tmp / "runs" / "whole"), weights(run)
        diff = max(
            float((v.float() - b["state_dict"][k].float()).abs().max())
            for k, v in a["state_dict"].items()
        )
        print(
            f"kills (SIGKILL at U({args.min_delay:g}, {args.max_delay:g}) s): {kills}; "
            f"resumed from a checkpoint: {resumed}; started again (killed before the first "
            f"checkpoint): {restarted}"
        )
        print(
            f"ended at step {b['global_step']} (uninterrupted: {a['global_step']}); "
            f"largest weight difference {diff:.2e}"
        )
        ok = b["global_step"] == a["global_step"] and diff < 1e-4
        print("survived: " + ("yes" if ok else "NO"))
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
