"""``torch.compile`` of the fusion blocks' read-out path in the recipe's training step.

    python bench/bench_compile.py [--episodes 96] [--steps 60] [--data DIR]

The driving recipe (``configs/builtin_drive.yaml``: ``frozen_text`` on the feature cache,
window 24, batch 64 in runs of 8) spends its step in the action tokens' read-out through the
four frozen fusion layers (against cached keys and values) and in the LSTM head. This times
the same pre-collated batches with the read-out as is and with each fusion block's
``query_forward`` compiled (``torch.compile(dynamic=True)``: the number of distinct frames per
batch varies), eager / compiled / eager again so drift shows, and prints the steady step
(median of steps 20..) and the compile time (the first 10 steps).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import ROOT, collect_episodes, machine

sys.path.insert(0, str(ROOT / "src"))

from mobile_vla.config import load_config
from mobile_vla.data.dataset import build_datasets
from mobile_vla.training.run import _use_feature_cache, make_loaders
from mobile_vla.training.runs import build_policy


def steady_step(data: Path, compiled: bool, steps: int) -> tuple[float, float]:
    """(median step s over steps 20.., seconds of the first 10 steps)."""
    cfg = load_config(ROOT / "configs" / "builtin_drive.yaml", [f"data.path={data}"])
    bundle = build_datasets(cfg)
    policy, _ = build_policy(cfg, bundle.stats)
    _use_feature_cache(cfg, policy, bundle, False)
    loader, _ = make_loaders(cfg, bundle)
    if compiled:
        for block in policy.backbone.fusion:
            block.query_forward = torch.compile(block.query_forward, dynamic=True)
    policy.train()
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    batches: list = []
    while len(batches) < steps:  # pre-collated, so both arms time the same batches' steps
        batches += itertools.islice(loader, steps - len(batches))
    times = []
    start = time.perf_counter()
    first = 0.0
    for i, batch in enumerate(batches[:steps]):
        t0 = time.perf_counter()
        loss, _ = policy.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        if i == 9:
            first = time.perf_counter() - start
    return float(np.median(times[20:])), first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=96)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--data", type=Path, help="96x96 episodes (default: collect some)")
    args = parser.parse_args()
    print(f"{machine()}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or collect_episodes(Path(tmp) / "data", args.episodes)
        rows = [("eager", False), ("compiled", True), ("eager, again", False)]
        result = {name: steady_step(data, c, args.steps) for name, c in rows}
    for name, (step, first) in result.items():
        print(f"  {name:<13} steady step {step * 1000:7.1f} ms   first 10 steps {first:6.1f} s")
    eager = (result["eager"][0] + result["eager, again"][0]) / 2
    print(f"  eager / compiled (steady): {eager / result['compiled'][0]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
