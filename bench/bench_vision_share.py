"""What a frozen-vision cache could save in LoRA training: the LoRA step vs the frozen vision
forward inside it, measured on the same batches in one process.

    python bench/bench_vision_share.py [--family builtin|kosmos2] [--device cpu|cuda]
                                       [--steps 20] [--batch 16]

LoRA sits in the language model (Kosmos-2) or the fusion transformer (built-in backbone); the
vision tower and its projector are frozen, so their output per frame could be computed once and
cached. Such a cache removes the vision forward from each step and nothing else; the bound on
its speed-up is step / (step - vision). Both are timed here: a full LoRA training step (forward,
backward, AdamW) on a batch of windows, then the vision tower + projector forward (no gradient)
of the distinct frames that step encoded.

``builtin``: configs/builtin_lora.yaml on simulated-size synthetic episodes (96x96 input).
``kosmos2``: configs/mobile_vla_lora.yaml with Kosmos-2's real geometry (Kosmos2Config()'s
defaults: CLIP ViT-L/14 at 224, 24-layer 2048-wide language model, 1.68 B parameters), randomly
initialised (timing does not depend on the weights; no Hub needed) and the tests' word-level
tokenizer; bf16 autocast on CUDA as the config's ``bf16-mixed``. Synthetic episodes: random
frames and actions, instructions from the scenario set.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import ROOT, machine

sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))


def synthetic_episodes(out: Path, episodes: int, size: int, frames: int = 18) -> Path:
    """Random frames and actions in the robot's layout, instructions from the scenario set."""
    from mobile_vla.data.hdf5 import write_episode
    from mobile_vla.sim.scenario import CANONICAL

    rng = np.random.default_rng(0)
    texts = [t.format(side=side) for t in CANONICAL.values() for side in ("left", "right")]
    out.mkdir(parents=True, exist_ok=True)
    for i in range(episodes):
        write_episode(
            out / f"episode_{i:03d}.h5",
            rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8),
            rng.uniform(-1, 1, (frames, 3)).astype(np.float32),
            texts[i % len(texts)],
            compression=None,
        )
    return out


def build(family: str, data: Path, batch: int, device: str) -> tuple[Any, Any, Any, Any]:
    """(cfg, policy with LoRA applied on ``device``, its strategy plan, the datasets)."""
    import torch

    from mobile_vla.config import load_config
    from mobile_vla.data.dataset import build_datasets
    from mobile_vla.training.runs import build_policy

    common = [f"data.path={data}", "data.feature_cache=false", f"trainer.batch_size={batch}"]
    backbone = None
    if family == "builtin":
        cfg = load_config(ROOT / "configs" / "builtin_lora.yaml", common)
    else:
        from tests.tiny_models import save_tokenizer
        from transformers import Kosmos2Config, Kosmos2Model, PreTrainedTokenizerFast

        from mobile_vla.models.backbones.kosmos2 import Kosmos2Backbone

        cfg = load_config(ROOT / "configs" / "mobile_vla_lora.yaml", common)
        tok_dir = data.parent / "tokenizer"
        save_tokenizer(tok_dir)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
        torch.manual_seed(0)
        with torch.device(device):
            model = Kosmos2Model(Kosmos2Config())
        backbone = Kosmos2Backbone(cfg.backbone, model=model, tokenizer=tokenizer)
    bundle = build_datasets(cfg)
    policy, plan = build_policy(cfg, bundle.stats, backbone=backbone)
    policy.to(device)
    return cfg, policy, plan, bundle


def measure(policy: Any, plan: Any, batches: list[dict], device: str, bf16: bool) -> tuple:
    """Median LoRA step time and median vision forward time (s) over ``batches`` after 3
    warm-up batches, and how many distinct frames a step encoded."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def autocast() -> Any:
        return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)

    opt = torch.optim.AdamW(plan.param_groups)
    bb = policy.backbone
    step_s, vision_s, counts = [], [], []
    for k, batch in enumerate(batches):
        batch = {
            key: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for key, v in batch.items()
        }
        sync()
        t0 = time.perf_counter()
        with autocast():
            loss, _ = policy.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync()
        t1 = time.perf_counter()
        frames = batch["images"].flatten(0, 1)
        if "frame_id" in batch:  # the step encodes each distinct frame once; so would a cache
            ids = batch["frame_id"].flatten().cpu().numpy()
            frames = frames[torch.as_tensor(np.unique(ids, return_index=True)[1], device=device)]
        with torch.no_grad(), autocast():
            bb.image_features(bb.preprocess(frames))
        sync()
        t2 = time.perf_counter()
        if k >= 3:
            step_s.append(t1 - t0)
            vision_s.append(t2 - t1)
            counts.append(len(frames))
    return float(np.median(step_s)), float(np.median(vision_s)), int(np.median(counts))


def report(name: str, batch: int, steps: int, step: float, vision: float, frames: int) -> None:
    print(
        f"LoRA training, {name}, window 8, chunk 10, batch {batch} ({frames} distinct frames "
        f"a step), median of {steps} steps after 3 warm-up:"
    )
    print(
        f"  live step {step * 1000:.0f} ms ({batch / step:.1f} samples/s); frozen vision tower "
        f"+ projector forward of its frames {vision * 1000:.0f} ms ({vision / step:.0%} of the "
        "step)"
    )
    print(
        f"  a frozen-vision cache removes at most that: <= {step / (step - vision):.2f}x "
        "(the LoRA layers' forward and backward remain)"
    )


def batches_of(bundle: Any, batch: int, n: int) -> list[dict]:
    from mobile_vla.training.common import collate

    rng = np.random.default_rng(0)
    return [
        collate([bundle.train[int(i)] for i in rng.choice(len(bundle.train), batch, replace=False)])
        for _ in range(n + 3)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["builtin", "kosmos2"], default="builtin")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--episodes", type=int, default=24)
    args = parser.parse_args()
    import torch

    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "no GPU"
    print(f"{machine()}, {gpu}, torch {torch.__version__}")
    size = 96 if args.family == "builtin" else 224
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_episodes(Path(tmp) / "data", args.episodes, size)
        cfg, policy, plan, bundle = build(args.family, data, args.batch, args.device)
        bf16 = args.device.startswith("cuda") and cfg.trainer.precision.startswith("bf16")
        step, vision, frames = measure(
            policy, plan, batches_of(bundle, args.batch, args.steps), args.device, bf16
        )
    name = {"builtin": "built-in backbone", "kosmos2": "Kosmos-2 geometry"}[args.family]
    precision = "bf16 autocast" if bf16 else "fp32"
    report(f"{name}, {args.device}, {precision}", args.batch, args.steps, step, vision, frames)


if __name__ == "__main__":
    main()
