"""Cost of each transfer strategy, measured side by side in one run.

    python bench/bench_strategies.py [--steps 40] [--skip-train] [--only per-step]

1. Trainable / total parameters per strategy for the Kosmos-2 geometry
   (microsoft/kosmos-2-patch14-224) and the PaliGemma-3B geometry, computed from their configs
   on the meta device (no weights downloaded), and for the built-in backbone.
2. Training samples/s (steady state, after 3 warm-up steps) and peak memory (RSS of the
   training process) per strategy for the built-in backbone on this machine, each arm live
   (the backbone runs every step) and on the feature cache below its first trainable layer,
   side by side, with the ratios the performance issue targets: each arm trains in its own
   process, so peak memory is that arm's alone. "k8" arms take batches of runs of 8
   consecutive windows of one episode (``trainer.consecutive_windows=8``), so windows share
   their frames' backbone work; their validation loss is a different sample order's.
   "per-step" arms (``head.per_step=true``) supervise the chunk after every frame of a window
   (windows at frames 0, 8, 16 of an episode): their windows/s count each supervised (history,
   chunk) pair, as the other arms' do; their validation loss is over per-step windows, so it
   is not comparable with the others' (what they learn in equal time is measured by
   ``bench/bench_time_to_quality.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from common import MOBILE_VLA, collect_episodes  # noqa: E402
from mobile_vla.config import load_config  # noqa: E402
from mobile_vla.data.normalization import ActionStats  # noqa: E402
from mobile_vla.models.policy import VLAPolicy  # noqa: E402
from mobile_vla.models.strategies import apply_strategy  # noqa: E402

STRATEGIES = ["frozen", "lora", "partial", "sandwich", "full", "gradual"]
STATS = ActionStats.from_arrays(["linear_x", "linear_y"], [np.zeros((2, 2))])


def meta_policy(family: str, strategy: str) -> VLAPolicy:
    """The real geometry from the family's default config, with no weights (meta device)."""
    if family == "kosmos2":
        from transformers import Kosmos2Config, Kosmos2Model

        from mobile_vla.models.backbones.kosmos2 import Kosmos2Backbone as Adapter

        with torch.device("meta"):
            model = Kosmos2Model(Kosmos2Config())
        overrides = ["backbone.name=kosmos2"]
    else:
        from transformers import PaliGemmaConfig, PaliGemmaModel

        from mobile_vla.models.backbones.paligemma import PaliGemmaBackbone as Adapter

        with torch.device("meta"):
            model = PaliGemmaModel(PaliGemmaConfig())
        overrides = ["backbone.name=paligemma"]
    cfg = load_config(
        ROOT / "configs" / "mobile_vla_base.yaml", [*overrides, f"train_setup.strategy={strategy}"]
    )
    policy = VLAPolicy(cfg, STATS, backbone=Adapter(cfg.backbone, model=model))
    return policy, cfg


def table_row(plan_table: dict) -> str:
    t = plan_table["all"]
    lora = plan_table["lora"]["trainable"]
    return (
        f"{t['trainable']:>15,} / {t['total']:>15,}  ({t['trainable'] / t['total']:6.2%})"
        f"   LoRA {lora:>12,}"
    )


def print_param_tables() -> None:
    for family, title in (
        ("kosmos2", "Kosmos-2 (microsoft/kosmos-2-patch14-224 geometry)"),
        ("paligemma", "PaliGemma-3B (google/paligemma-3b-pt-224 geometry)"),
    ):
        print(f"\n{title}: trainable / total parameters (Case 3 = frozen, Case 4 = lora)")
        for strategy in STRATEGIES:
            policy, cfg = meta_policy(family, strategy)
            plan = apply_strategy(policy, cfg.train_setup)
            print(f"  {strategy:<9} {table_row(plan.table)}")
    print("\nbuilt-in backbone (configs/builtin_base.yaml): trainable / total parameters")
    for strategy in STRATEGIES:
        cfg = load_config(
            ROOT / "configs" / "builtin_base.yaml", [f"train_setup.strategy={strategy}"]
        )
        torch.manual_seed(0)
        policy = VLAPolicy(cfg, STATS)
        plan = apply_strategy(policy, cfg.train_setup)
        print(f"  {strategy:<9} {table_row(plan.table)}")


# (label, strategy, extra overrides); each arm trains live (data.feature_cache=false, what
# every strategy but frozen did before the cache below the first trainable layer) and cached
BF16 = ["--trainer.precision=bf16-mixed"]
K8 = ["--trainer.consecutive_windows=8"]  # batches of runs of 8 consecutive windows
TOP2 = ["--train_setup.lora_layers=2"]
# the chunk after every frame; 3 windows an episode, so more epochs fit in the steps
PER_STEP = ["--head.per_step=true", "--trainer.max_epochs=1000"]
ARMS = [  # (label, strategy, extra overrides, modes)
    ("frozen", "frozen", [], ("live", "cached")),
    ("lora (all layers)", "lora", [], ("live", "cached")),
    ("lora (all layers) bf16", "lora", BF16, ("cached",)),
    ("lora (top 2 layers)", "lora", TOP2, ("live", "cached")),
    ("lora (top 2 layers) bf16", "lora", [*TOP2, *BF16], ("cached",)),
    ("partial (last 2)", "partial", [], ("live", "cached")),
    ("partial (last 2) bf16", "partial", BF16, ("cached",)),
    ("full", "full", [], ("live",)),
    ("frozen k8", "frozen", K8, ("cached",)),
    ("lora (all layers) bf16 k8", "lora", [*BF16, *K8], ("cached",)),
    ("lora (top 2 layers) bf16 k8", "lora", [*TOP2, *BF16, *K8], ("cached",)),
    ("partial (last 2) bf16 k8", "partial", [*BF16, *K8], ("cached",)),
    ("frozen per-step", "frozen", PER_STEP, ("cached",)),
    ("lora (all layers) per-step", "lora", PER_STEP, ("cached",)),
    ("lora (all layers) bf16 per-step", "lora", [*BF16, *PER_STEP], ("cached",)),
    ("lora (top 2 layers) bf16 per-step", "lora", [*TOP2, *BF16, *PER_STEP], ("cached",)),
    ("partial (last 2) bf16 per-step", "partial", [*BF16, *PER_STEP], ("cached",)),
]
TARGETS = {  # the performance issue's targets: a path against the live fp32 figure named
    "frozen cached": ("loop", 20.0, "frozen live"),
    "lora (all layers) cached": ("step", 3.0, "lora (all layers) live"),
    "lora (all layers) bf16 cached": ("step", 3.0, "lora (all layers) live"),
    "lora (top 2 layers) cached": ("step", 5.0, "lora (all layers) live"),
    "lora (top 2 layers) bf16 cached": ("step", 5.0, "lora (all layers) live"),
    "partial (last 2) cached": ("step", 5.0, "partial (last 2) live"),
    "partial (last 2) bf16 cached": ("step", 5.0, "partial (last 2) live"),
    "frozen k8 cached": ("loop", 20.0, "frozen live"),
    "lora (all layers) bf16 k8 cached": ("step", 3.0, "lora (all layers) live"),
    "lora (top 2 layers) bf16 k8 cached": ("step", 5.0, "lora (all layers) live"),
    "partial (last 2) bf16 k8 cached": ("step", 5.0, "partial (last 2) live"),
    "frozen per-step cached": ("loop", 20.0, "frozen live"),
    "lora (all layers) per-step cached": ("step", 3.0, "lora (all layers) live"),
    "lora (all layers) bf16 per-step cached": ("step", 3.0, "lora (all layers) live"),
    "lora (top 2 layers) bf16 per-step cached": ("step", 5.0, "lora (all layers) live"),
    "partial (last 2) bf16 per-step cached": ("step", 5.0, "partial (last 2) live"),
}


def _train(data: Path, tmp: Path, name: str, strategy: str, extra: list[str], cached: bool,
           steps: int) -> dict | None:  # fmt: skip
    import time

    run = tmp / "runs" / name
    cmd = [
        *MOBILE_VLA,
        "train",
        str(ROOT / "configs" / "builtin_base.yaml"),
        "-q",
        f"--data.path={data}",
        f"--data.cache_dir={tmp / ('cache' if cached else 'cache-live')}",
        f"--data.feature_cache={'true' if cached else 'false'}",
        f"--train_setup.strategy={strategy}",
        *extra,
        f"--trainer.max_steps={steps}",
        f"--trainer.output_dir={tmp / 'runs'}",
        f"--trainer.run_name={name}",
        "--trainer.limit_val_batches=4",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"  {name}: failed: {proc.stderr.strip().splitlines()[-1]}")
        return None
    stats = json.loads((run / "train_stats.json").read_text())
    rows = (run / "logs" / "csv" / "metrics.csv").read_text().splitlines()
    val = [r.split(",")[-1] for r in rows[1:] if r.split(",")[-1]]
    params = json.loads((run / "params.json").read_text())["params"]["all"]
    return {  # supervised windows/s: a row's, or each real frame's of a per-step row
        "loop": stats["train_windows_per_s"],
        "step": stats["train_step_windows_per_s"],
        "rss": stats["peak_memory_bytes"] / 2**30,
        "wall": wall,
        "val": float(val[-1]) if val else float("nan"),
        "trainable": params["trainable"],
        "cache": "cached" in stats.get("feature_cache", ""),
    }


def selected(only: str | None) -> set[str]:
    """The arm keys to run: every one, or those whose label holds ``only`` and the live
    figures their targets are measured against."""
    keys = {f"{label} {mode}" for label, _, _, modes in ARMS for mode in modes}
    if only is None:
        return keys
    chosen = {k for k in keys if only in k}
    return chosen | {TARGETS[k][2] for k in chosen if k in TARGETS}


def train_throughput(steps: int, only: str | None = None) -> None:
    keys = selected(only)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data = tmp_path / "data"
        collect_episodes(data, 24)
        print(
            f"\nbuilt-in backbone, training on this machine ({os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads): configs/builtin_base.yaml, window 8, "
            f"chunk 10, batch 16, 96x96, fp32, {steps} steps; supervised windows/s after 3 "
            "warm-up steps (loop: fetch + collate + step; step: the optimizer step alone); "
            "wall: the whole process, cache build included; val: validation loss after the "
            "same steps (per-step arms: over per-step windows)"
        )
        head = f"  {'arm':<40} {'loop/s':>8} {'step/s':>8} {'peak RSS':>9} {'wall s':>7} {'val':>8}"
        print(head)
        results: dict[str, dict] = {}
        for label, strategy, extra, modes in ARMS:
            for cached in [m == "cached" for m in modes]:
                key = f"{label} {'cached' if cached else 'live'}"
                if key not in keys:
                    continue
                name = f"{strategy}{'-'.join(['', *[e.split('=')[-1] for e in extra]])}"
                name += "-cached" if cached else "-live"
                r = _train(data, tmp_path, name, strategy, extra, cached, steps)
                if r is None:
                    continue
                results[key] = r
                print(
                    f"  {key:<40} {r['loop']:>8.1f} {r['step']:>8.1f} {r['rss']:>7.2f} G "
                    f"{r['wall']:>7.0f} {r['val']:>8.4f}"
                    + ("" if r["cache"] == cached else "  (cache not used!)")
                )
        print("\nratios (cached against the live figure named), peak memory, target:")
        for label, (kind, target, base) in TARGETS.items():
            a, b = results.get(label), results.get(base)
            if a is None or b is None:
                continue
            ratio = a[kind] / b[kind]
            mem = a["rss"] / b["rss"] - 1
            val = a["val"] / b["val"] - 1
            print(
                f"  {label:<40} {kind:>4}: {ratio:5.1f}x against {base} (target >= "
                f"{target:g}x: {'met' if ratio >= target else 'NOT met'}); peak memory "
                f"{mem:+.0%} (limit +20%)"
                + ("" if "per-step" in label else f"; val loss {val:+.2%} (limit 1%)")
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument(
        "--only", help="run the arms whose label holds this (and their live baselines)"
    )
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}"
    )
    print_param_tables()
    if not args.skip_train:
        train_throughput(args.steps, args.only)


if __name__ == "__main__":
    main()
