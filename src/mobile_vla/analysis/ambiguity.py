"""How much does the training loss ask of the instruction? Measured on the data and on runs.

A left and a right episode of one scene (``collect`` pairs them: the same seed, layout and
look) start from the same image. Their histories stay equal only until the robot first moves
sideways; after that every frame shows the side already taken, so a policy can read the
side from the image and the instruction adds nothing. So:

* **from the data**: per scene pair, the first frame whose image differs between the left and
  the right episode; the share of (history, chunk) pairs whose history is the same for both
  instructions while the chunks differ — the only pairs where the instruction is the sole
  cue — among all supervised pairs;
* **from trained runs** (optional): each run's validation loss per frame index (per-step
  windows from the episode's first frame), so the share of the loss that sits where the
  instruction is the only cue, and what a policy that reads it removes there, can be read off.

    python -m mobile_vla.analysis.ambiguity DATA [--runs RUN ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from mobile_vla.config import DataConfig
from mobile_vla.data.episodes import derived_of, load_episodes
from mobile_vla.data.hdf5 import EpisodeInfo

#: mean absolute pixel difference (0-255) below which two frames count as the same image
SAME_IMAGE = 0.5


def scene_pairs(episodes: list[EpisodeInfo]) -> list[tuple[EpisodeInfo, EpisodeInfo]]:
    """(left, right) recorded episodes that share a scene (seed, layout, distance)."""
    by_scene: dict[tuple[Any, ...], dict[str, EpisodeInfo]] = defaultdict(dict)
    for ep in derived_of(episodes)[0]:
        seed = ep.attrs.get("seed")
        if seed is None or ep.side not in ("left", "right"):
            continue
        by_scene[(seed, ep.layout, ep.distance)].setdefault(ep.side, ep)
    return [(s["left"], s["right"]) for s in by_scene.values() if len(s) == 2]


def data_ambiguity(data: str | Path, chunk: int = 10, limit: int = 0) -> dict[str, Any]:
    """The data-only measures of the module docstring, on the recorded episodes of ``data``."""
    from mobile_vla.data.frame_cache import DirectFrames

    cfg = DataConfig(path=str(data))
    episodes = load_episodes(cfg)
    pairs = scene_pairs(episodes)
    if limit:
        pairs = pairs[:limit]
    if not pairs:
        raise ValueError(f"'{data}' holds no left/right episode pairs of one scene")
    source = DirectFrames(pairs[0][0].image_shape[:2])
    first_diff, ambiguous, supervised = [], 0, 0
    for left, right in pairs:
        a = source.window(left, np.arange(left.num_frames)).astype(np.float32)
        b = source.window(right, np.arange(right.num_frames)).astype(np.float32)
        n = min(len(a), len(b))
        same = [float(np.abs(a[t] - b[t]).mean()) < SAME_IMAGE for t in range(n)]
        d = same.index(False) if False in same else n
        first_diff.append(d)
        for ep in (left, right):
            supervised += ep.num_frames
        # pairs whose history (frames 0..t) is the same for both, chunks differing
        for t in range(d):
            ca = left.actions[t : t + chunk]
            cb = right.actions[t : t + chunk]
            m = min(len(ca), len(cb))
            if not np.allclose(ca[:m], cb[:m]):
                ambiguous += 2  # the left and the right episode's pair at frame t
    counts = np.bincount(first_diff)
    out: dict[str, Any] = {
        "pairs": len(pairs),
        "first_different_frame": {str(i): int(c) for i, c in enumerate(counts) if c},
        "supervised_pairs": supervised,
        "instruction_only_pairs": ambiguous,
        "instruction_only_share": ambiguous / supervised if supervised else None,
    }
    # counterfactual twins: each twin frame shares its source's history (the same frames)
    # under the other instruction with the other side's chunk, so it and the source's pair at
    # that frame are both instruction-only
    in_pairs = {ep.path.stem for pair in pairs for ep in pair}
    twins = [
        ep for group in derived_of(episodes)[1].values() for ep in group if ep.source in in_pairs
    ]
    if twins:
        twin_frames = sum(ep.num_frames for ep in twins)
        both = ambiguous + 2 * twin_frames  # (the source's frame 0 counted once is close)
        out["with_twins"] = {
            "twins": len(twins),
            "supervised_pairs": supervised + twin_frames,
            "instruction_only_pairs": both,
            "instruction_only_share": both / (supervised + twin_frames),
        }
    return out


def loss_by_frame(run: str | Path, which: str = "best", part: str = "val") -> dict[str, Any]:
    """A run's per-step loss on its ``part`` episodes (recorded ones), by frame index: the
    chunk after frame t, averaged over episodes."""
    import torch
    import torch.nn.functional as F

    from mobile_vla.data.dataset import EpisodeDataset
    from mobile_vla.training.common import collate
    from mobile_vla.training.runs import Run

    opened = Run.open(run)
    policy, cfg = opened.policy(which), opened.config
    episodes = [e for e in opened.episodes(part) if e.source is None]
    ds = EpisodeDataset(episodes, cfg.data, policy.normalizer, per_step=True)
    w = cfg.data.window_size
    total = np.zeros(w)
    count = np.zeros(w)
    with torch.no_grad():
        for s in range(0, len(ds), 8):
            batch = collate([ds[i] for i in range(s, min(s + 8, len(ds)))])
            out = policy(batch, every_step=True)
            target = batch["actions"].flatten(0, 1)
            mask = batch["action_mask"].flatten(0, 1).float()
            per = F.huber_loss(out.logits.float(), target, reduction="none").mean(-1)
            frame = (per * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            real = (mask.sum(-1) > 0).view(-1, w).numpy()
            start = batch["frame"].numpy()[:, None] + np.arange(w)[None]
            for f, r, t in zip(frame.view(-1, w).numpy(), real, start, strict=True):
                for j in np.nonzero(r)[0]:
                    if t[j] < w:
                        total[t[j]] += f[j]
                        count[t[j]] += 1
    per_frame = (total / np.maximum(count, 1)).tolist()
    return {"run": str(run), "checkpoint": which, "episodes": len(episodes), "loss": per_frame}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path, help="a collection with left/right pairs")
    ap.add_argument("--runs", nargs="*", default=[], help="run folders (per-step windows)")
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    result: dict[str, Any] = {"data": data_ambiguity(args.data)}
    d = result["data"]
    print(
        f"{d['pairs']} scene pairs: the left and right episodes' images first differ at frame "
        f"{d['first_different_frame']} (frame: pairs); {d['instruction_only_pairs']} of "
        f"{d['supervised_pairs']} supervised (history, chunk) pairs "
        f"({100 * (d['instruction_only_share'] or 0):.1f}%) have a history both instructions "
        "share and chunks that differ: only there is the instruction the sole cue"
    )
    if "with_twins" in d:
        t = d["with_twins"]
        print(
            f"with its {t['twins']} counterfactual twins: {t['instruction_only_pairs']} of "
            f"{t['supervised_pairs']} ({100 * t['instruction_only_share']:.1f}%)"
        )
    result["runs"] = []
    for run in args.runs:
        r = loss_by_frame(run)
        result["runs"].append(r)
        loss = r["loss"]
        share = sum(loss[:2]) / sum(loss) if sum(loss) else 0.0
        print(
            f"{run}: validation loss by frame "
            + " ".join(f"{v:.3f}" for v in loss[:6])
            + f" ... mean {np.mean(loss):.4f}; frames 0-1 hold {100 * share:.0f}% of it"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
