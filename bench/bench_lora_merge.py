"""Inference with a frozen LoRA adapter: rank-r matmuls beside each wrapped layer against the
adapter merged into the base weights once (what ``load_policy`` does for evaluation, DAgger
and serving).

    python bench/bench_lora_merge.py [--steps 200] [--rank 8]

A Case-4 policy on the built-in backbone (``configs/builtin_lora.yaml``: LoRA on q/k/v/o and
the MLP of every fusion layer, window 8, chunk 10, 96x96) with a non-zero adapter, measured
side by side in one process, unmerged and merged, alternating: the closed loop's control step
(``PolicyController.act``: one new frame through the backbone + the head over the window), and
a batch of 16 frames through the backbone (the server's batched step, offline evaluation).
Prints p50 / p99 and the ratio, and the largest difference between the two outputs.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np
import torch

from common import ROOT, machine

sys.path.insert(0, str(ROOT / "src"))

from mobile_vla.config import load_config
from mobile_vla.data.normalization import ActionStats
from mobile_vla.models.runtime import PolicyController
from mobile_vla.training.runs import build_policy, merge_lora


def policies(rank: int) -> tuple[torch.nn.Module, torch.nn.Module, object]:
    cfg = load_config(
        ROOT / "configs" / "builtin_lora.yaml",
        [f"train_setup.lora_r={rank}", f"train_setup.lora_alpha={2 * rank}"],
    )
    rng = np.random.default_rng(0)
    actions = [rng.choice([-1.15, 0.0, 1.15], (24, 2)) for _ in range(8)]
    stats = ActionStats.from_arrays(["linear_x", "linear_y"], actions)
    policy, _ = build_policy(cfg, stats)
    with torch.no_grad():  # a trained adapter: B is zero at initialisation
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    policy.eval().requires_grad_(False)
    merged = copy.deepcopy(policy)
    layers = merge_lora(merged)
    print(f"LoRA rank {rank}: {layers} wrapped layers merged")
    return policy, merged, cfg


def timed(fn, n: int) -> np.ndarray:
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        fn()
        out[i] = (time.perf_counter() - t0) * 1000
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    print(f"{machine()}; torch threads {torch.get_num_threads()}")
    plain, merged, cfg = policies(args.rank)
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (args.steps + 10, 96, 96, 3), dtype=np.uint8)
    batch = torch.from_numpy(frames[:16].transpose(0, 3, 1, 2).copy())
    texts = ["go to the left of the box"] * 16
    with torch.no_grad():
        a = plain.frame_features(batch, texts)
        b = merged.frame_features(batch, texts)
    diff = float((a - b).abs().max())
    print(f"largest difference of the context vectors, unmerged vs merged: {diff:.2e}")
    ctrl = {name: PolicyController(p, cfg) for name, p in (("unmerged", plain), ("merged", merged))}
    step = {name: [0] for name in ctrl}

    def act(name: str) -> None:
        i = step[name][0] = step[name][0] + 1
        ctrl[name].act(frames[i % len(frames)], "go to the left of the box")

    def feats(p: torch.nn.Module) -> None:
        with torch.no_grad():
            p.frame_features(batch, texts)

    results: dict[str, dict[str, list[float]]] = {"control step": {}, "16 frames": {}}
    for _ in range(2):  # warm-up, then alternate in blocks so drift hits both alike
        for name, p in (("unmerged", plain), ("merged", merged)):
            act(name)
            feats(p)
    for _block in range(4):
        for name, p in (("unmerged", plain), ("merged", merged)):
            results["control step"].setdefault(name, []).extend(
                timed(lambda n=name: act(n), args.steps // 4)
            )
            results["16 frames"].setdefault(name, []).extend(timed(lambda p=p: feats(p), 10))
    for what, r in results.items():
        print(f"\n{what} (ms):")
        for name, values in r.items():
            v = np.asarray(values)
            print(f"  {name:<9} p50 {np.percentile(v, 50):7.2f}   p99 {np.percentile(v, 99):7.2f}")
        ratio = np.percentile(r["unmerged"], 50) / np.percentile(r["merged"], 50)
        print(f"  unmerged / merged (p50): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
