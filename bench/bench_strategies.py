"""Cost of each transfer strategy, measured side by side in one run.

    python bench/bench_strategies.py [--steps 12] [--skip-train]

1. Trainable / total parameters per strategy for the Kosmos-2 geometry
   (microsoft/kosmos-2-patch14-224) and the PaliGemma-3B geometry, computed from their configs
   on the meta device (no weights downloaded), and for the built-in backbone.
2. Training samples/s (steady state, after 3 warm-up steps) and peak memory (RSS of the
   training process) per strategy for the built-in backbone on this machine: each strategy
   trains in its own process, so peak memory is that strategy's alone.
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


def train_throughput(steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data = tmp_path / "data"
        mvla = MOBILE_VLA
        collect_episodes(data, 24)
        print(
            f"\nbuilt-in backbone, training on this machine ({os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads): configs/builtin_base.yaml, window 8, "
            f"chunk 10, batch 16, 96x96, fp32, {steps} steps, throughput after 3 warm-up steps"
        )
        print(f"  {'strategy':<9} {'samples/s':>10} {'peak RSS':>10} {'trainable':>12}")
        for strategy in STRATEGIES:
            run = tmp_path / "runs" / strategy
            cmd = [
                *mvla,
                "train",
                str(ROOT / "configs" / "builtin_base.yaml"),
                "-q",
                f"--data.path={data}",
                f"--data.cache_dir={tmp_path / 'cache'}",
                f"--train_setup.strategy={strategy}",
                f"--trainer.max_steps={steps}",
                f"--trainer.output_dir={tmp_path / 'runs'}",
                f"--trainer.run_name={strategy}",
                "--trainer.limit_val_batches=2",
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"  {strategy:<9} failed: {proc.stderr.strip().splitlines()[-1]}")
                continue
            stats = json.loads((run / "train_stats.json").read_text())
            params = json.loads((run / "params.json").read_text())["params"]["all"]
            print(
                f"  {strategy:<9} {stats['train_samples_per_s']:>10.1f} "
                f"{stats['peak_memory_bytes'] / 2**30:>8.2f} GiB {params['trainable']:>12,}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}"
    )
    print_param_tables()
    if not args.skip_train:
        train_throughput(args.steps)


if __name__ == "__main__":
    main()
