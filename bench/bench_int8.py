"""Is int8 dynamic quantization a lever for serving? The frames' backbone pass (what a served
request spends most of its time in) in float32 against ``quantize_dynamic`` of every linear
layer, side by side in one run, with how far the context vectors move.

    python bench/bench_int8.py --run RUN [--sessions 4]

RUN is any trained run folder (its ``selected`` checkpoint when it has one, else ``best``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mobile_vla.models.runtime import PolicyController  # noqa: E402
from mobile_vla.training.runs import load_policy  # noqa: E402


def median_ms(policy: torch.nn.Module, frames: torch.Tensor, texts: list[str]) -> tuple:
    times = []
    with torch.inference_mode():
        for _ in range(25):
            t0 = time.perf_counter()
            out = policy.frame_features(frames, texts)
            times.append(time.perf_counter() - t0)
    return float(np.median(times[5:]) * 1000), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--sessions", type=int, default=4)
    args = parser.parse_args()
    which = "selected" if (args.run / "checkpoints" / "selected").exists() else "best"
    policy, cfg = load_policy(args.run, which)
    policy.eval()
    ctrl = PolicyController(policy, cfg)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(args.sessions)]
    frames = torch.stack([ctrl.frame_tensor(im) for im in images])
    texts = ["go around the box on the left"] * args.sessions
    fp32, ref = median_ms(policy, frames, texts)
    quantized = torch.ao.quantization.quantize_dynamic(policy, {torch.nn.Linear}, torch.qint8)
    int8, out = median_ms(quantized, frames, texts)
    moved = float((out - ref).abs().max() / ref.abs().max())
    print(
        f"{args.run} ({which}), {args.sessions} frames, {torch.get_num_threads()} threads: "
        f"float32 {fp32:.1f} ms, int8 dynamic {int8:.1f} ms, ratio {fp32 / int8:.2f}x; "
        f"context vectors moved by up to {moved:.0%} of their largest value"
    )


if __name__ == "__main__":
    main()
