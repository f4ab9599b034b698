"""How close a Case-4 training step comes to what this CPU can multiply, and where its time goes.

    python bench/bench_case4_limit.py [--steps 12] [--frames 96]

1. **The limit.** This machine's matrix-multiply throughput in float32 (and bfloat16 where it
   is native), at the shapes the fusion layers multiply in one step — (frames x tokens, 256)
   by (256, 256), by (256, 1024) and (frames x tokens, 1024) by (1024, 256) — and at a large
   square product; the best of those is "the limit".
2. **The step.** One Case-4 training step as ``configs/builtin_case4.yaml`` runs it: LoRA (r 8)
   in every fusion layer, per-step windows on the feature cache (the vision tower, sentence
   encoder and projections cached; every fusion layer live on the image and text tokens; the
   last layer on the action token only, with the keys and values of the rest), the LSTM head,
   AdamW. Its floating-point operations are counted by ``torch.utils.flop_counter`` (forward
   and backward), its time measured over ``--steps`` steps after two warm-up steps.
3. **The fraction**: counted FLOPs / step time / the limit, and a profile of the step: data,
   forward, backward, optimizer, and within forward + backward the operators by kind —
   attention projections, attention itself, MLP, LoRA, norms and element-wise work, the head.
   Both LoRA paths are timed side by side (steps alternated): PEFT's forward and the fused one
   (``models/lora_fused.py``, ``train_setup.lora_fused``, the default); the fraction and the
   profile are the fused path's.

The batch is synthetic but has the shapes a real one has (4 episodes of 24 frames, 64 image
and 16 text tokens a frame), so the script needs no data.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from mobile_vla.config import load_config
from mobile_vla.data.normalization import ActionStats
from mobile_vla.hardware import cpu_has_native_bf16
from mobile_vla.training.runs import build_policy

TEXT_TOKENS = 16  # the instruction templates' length in MiniLM tokens (with [CLS], [SEP])


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 0.6) -> float:
    """Best sustained GFLOP/s of (m, k) @ (k, n) over repeated products."""
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        dt = (time.perf_counter() - t0) / 5
        best = max(best, 2 * m * k * n / dt / 1e9)
    return best


def synthetic_batch(policy: Any, frames: int, windows: int) -> dict[str, Any]:
    """A per-step cached batch of the right shapes: ``windows`` windows of ``frames /
    windows`` frames, each frame's prefix (image + text tokens) entering fusion layer 0."""
    bb = policy.backbone
    w = frames // windows
    p = bb.vision.num_patches + TEXT_TOKENS
    g = torch.Generator().manual_seed(0)
    dims = len(policy.action_dims)
    return {
        "prefix_kv": torch.zeros(frames, 0, 2, p, bb.hidden_size),
        "prefix_mask": torch.ones(frames, p, dtype=torch.bool),
        "prefix_hidden": torch.randn(frames, p, bb.hidden_size, generator=g),
        "prefix_index": torch.arange(frames).view(windows, w),
        "instruction": ["Take the left way around the obstacles to reach the bottle"] * windows,
        "obs_mask": torch.ones(windows, w, dtype=torch.bool),
        "actions": torch.rand(windows, w, policy.chunk, dims, generator=g) * 2 - 1,
        "action_mask": torch.ones(windows, w, policy.chunk, dtype=torch.bool),
    }


def kind_of(name: str, shapes: list[Any], rank: int, width: int) -> str:
    """Which part of the step an operator belongs to, from its name and input shapes."""
    flat = [d for s in shapes if isinstance(s, list | tuple) for d in s if isinstance(d, int)]
    if "lstm" in name or "_thnn_fused" in name:
        return "head (LSTM)"
    if name in ("aten::addmm", "aten::mm", "aten::matmul", "aten::linear", "aten::bmm"):
        if rank in flat:
            return "LoRA"
        if 4 * width in flat:
            return "MLP (fc1, fc2)"
        if name == "aten::bmm":
            return "attention (scores, values)"
        return "attention projections (q, k, v, o)"
    if "softmax" in name or "scaled_dot_product" in name or "masked_fill" in name:
        return "attention (scores, values)"
    if "gelu" in name:
        return "MLP (fc1, fc2)"
    if "layer_norm" in name:
        return "norms"
    if "adam" in name or "_foreach" in name:
        return "optimizer"
    return "element-wise and copies"


def _step(phases: dict[str, list[float]]) -> float:
    return sum(float(np.median(v)) for v in phases.values())


def time_steps(
    variants: dict[str, tuple[Any, Any]], batch: dict[str, Any], steps: int
) -> dict[str, dict[str, list[float]]]:
    """Seconds of each phase of a training step (data, forward, backward, optimizer), per
    variant, the variants' steps alternated so that drift of the machine hits both alike;
    two warm-up steps each are not counted."""
    opts = {
        n: torch.optim.AdamW([dict(g) for g in plan.param_groups])
        for n, (_, plan) in variants.items()
    }
    phases: dict[str, dict[str, list[float]]] = {n: defaultdict(list) for n in variants}
    for i in range(steps + 2):
        for name, (policy, _) in variants.items():
            t0 = time.perf_counter()
            b = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            t1 = time.perf_counter()
            loss, _ = policy.loss(b)
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            opts[name].step()
            opts[name].zero_grad()
            t4 = time.perf_counter()
            if i >= 2:
                for phase, dt in (
                    ("data", t1 - t0),
                    ("forward", t2 - t1),
                    ("backward", t3 - t2),
                    ("optimizer", t4 - t3),
                ):
                    phases[name][phase].append(dt)
    return phases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--frames", type=int, default=96, help="frames a step (4 windows of 24)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config("configs/builtin_case4.yaml", ["trainer.precision=32"])
    geometry = cfg.backbone.builtin
    width = geometry.fusion_width
    rank = cfg.train_setup.lora_r
    tokens = args.frames * ((geometry.image_size // geometry.patch_size) ** 2 + TEXT_TOKENS)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\n1. the limit: matrix-multiply throughput (GFLOP/s, best sustained)")
    shapes = [
        ("fusion q/k/v/o", tokens, width, width),
        ("fusion fc1", tokens, width, 4 * width),
        ("fusion fc2", tokens, 4 * width, width),
        ("square 2048", 2048, 2048, 2048),
    ]
    dtypes = [torch.float32] + ([torch.bfloat16] if cpu_has_native_bf16() else [])
    limit = {}
    for dtype in dtypes:
        rates = {name: matmul_gflops(m, k, n, dtype) for name, m, k, n in shapes}
        limit[dtype] = max(rates.values())
        print(
            f"   {str(dtype).removeprefix('torch.'):>9}: "
            + ", ".join(f"{name} {r:.0f}" for name, r in rates.items())
            + f" -> limit {limit[dtype]:.0f}"
        )
    if torch.bfloat16 not in limit:
        print("   bfloat16: not native on this CPU (no AVX512-BF16 / AMX): emulated, not a limit")
    skinny = {
        "LoRA A (tokens, width) @ (width, r)": matmul_gflops(tokens, width, rank, torch.float32),
        "LoRA B (tokens, r) @ (r, width)": matmul_gflops(tokens, rank, width, torch.float32),
    }
    print(
        "   LoRA's skinny products, float32: "
        + ", ".join(f"{name} {r:.0f}" for name, r in skinny.items())
        + " (memory-bound: each reads or writes a (tokens, width) activation for 2 x r FLOPs "
        "an element)"
    )

    stats = ActionStats.from_arrays(list(cfg.data.action_dims), [np.zeros((4, 2), np.float32)])
    variants = {}
    for fused in (False, True):  # the same seed: the same weights on both paths
        c = load_config(
            "configs/builtin_case4.yaml",
            ["trainer.precision=32", f"train_setup.lora_fused={fused}"],
        )
        policy, plan = build_policy(c, stats)
        variants["fused" if fused else "peft"] = (policy, plan)
    batch = synthetic_batch(variants["fused"][0], args.frames, 4)
    from torch.utils.flop_counter import FlopCounterMode

    flops, losses = {}, {}
    for name, (policy, _) in variants.items():
        with FlopCounterMode(display=False) as counter:
            loss, _ = policy.loss(batch)
            loss.backward()
        flops[name], losses[name] = counter.get_total_flops(), loss.item()
        policy.zero_grad()
    phases = time_steps(variants, batch, args.steps)
    print(
        f"\n2. one Case-4 step ({args.frames} frames, {tokens} image+text tokens, LoRA r "
        f"{rank} in {geometry.fusion_layers} fusion layers), PEFT's LoRA forward and the fused "
        f"one (train_setup.lora_fused), steps alternated; losses {losses['peft']:.6f} and "
        f"{losses['fused']:.6f}"
    )
    f32 = limit[torch.float32]
    fraction = {}
    for name in variants:
        step = sum(float(np.median(v)) for v in phases[name].values())
        fb = float(np.median(phases[name]["forward"]) + np.median(phases[name]["backward"]))
        achieved = flops[name] / fb / 1e9
        fraction[name] = achieved / f32
        print(
            f"   {name:>5}: counted {flops[name] / 1e9:.1f} GFLOP; median step {step:.3f} s ("
            + ", ".join(f"{k} {np.median(v):.3f}" for k, v in phases[name].items())
            + f"); forward + backward {achieved:.0f} GFLOP/s = {fraction[name]:.0%} of the "
            f"float32 limit ({f32:.0f}); the whole step {flops[name] / step / 1e9 / f32:.0%}"
        )
    print(
        f"\n3. achieved: {fraction['fused']:.0%} of the float32 limit with the fused path "
        f"(target >= 50%), {fraction['peft']:.0%} with PEFT's; fused / PEFT step time "
        f"{_step(phases['fused']) / _step(phases['peft']):.2f}x"
    )
    policy, _ = variants["fused"]
    opt = torch.optim.AdamW([dict(g) for g in variants["fused"][1].param_groups])

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss, _ = policy.loss(batch)
        loss.backward()
    opt.zero_grad()
    by_kind: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages(group_by_input_shape=True):
        kind = kind_of(evt.key, list(evt.input_shapes or []), rank, width)
        by_kind[kind] += evt.self_cpu_time_total / 1e6
    total = sum(by_kind.values())
    print("   where forward + backward goes (profiler, self time):")
    for kind, secs in sorted(by_kind.items(), key=lambda x: -x[1]):
        print(f"   {kind:>36}: {secs:.3f} s ({secs / total:.0%})")
    lora_share = by_kind.get("LoRA", 0.0) / total
    print(
        f"\n4. why not more: LoRA is {lora_share:.0%} of the time for "
        f"~{2 * rank / width:.0%} of the FLOPs of the projections it adapts; its products run at "
        f"{min(skinny.values()):.0f}-{max(skinny.values()):.0f} GFLOP/s against {f32:.0f}. "
        "The fused path already reads each projection's input once for its base and A "
        "products and adds B's product in the base product's epilogue (addmm). Next lever: "
        "q, k and v read the same normed tokens: one product with [Wq; Wk; Wv; Aq; Ak; Av] "
        "would read them once instead of three times."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
