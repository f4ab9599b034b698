"""Can the stop be read from one image? A linear read-out of "stop now" against "drive on".

Case 4 fails at the stop (docs/case3-vs-case4.md): one step into the basket or short of the
goal. Whether the frozen vision tower's features of a single frame tell the frame where the
expert stops from the frame ``gap`` steps before it (the robot ``gap`` x 11.5 cm further
back) decides where a lever can act: if they do, the fusion layers and the head have what they
need; if they do not, only the vision tower (adapters in it, or a sharper image) can help.

For every recorded expert episode of DATA (counterfactual twins and policy-driven episodes
left out) the stop frame is the first frame after the last forward command; the pair is that
frame (label 1) and the frame ``gap`` steps earlier (label 0). The episodes are split into
training and held-out ones by episode (an episode's frames are on one side only; the left and
the right episode of one scene may fall on different sides), and a logistic
read-out (standardised inputs, PCA to at most ``components`` dimensions, the L2 weight chosen
by cross-validation on the training pairs) is fitted on the training pairs. Reported: train
and held-out accuracy (chance 0.5), for each gap and for:

* the frozen vision tower's tokens of the frame (what Case 4's fusion layers read; the
  shipped weights, as ``configs/builtin_case4.yaml`` loads them);
* the frame's pixels (the same read-out on what the camera gives; a reference);
* negative control: the vision tokens with the labels shuffled across episodes.

    python -m mobile_vla.analysis.stop_probe DATA [--episodes N] [--gaps 1 2 4] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mobile_vla.errors import MobileVLAError
from mobile_vla.evaluation.closed_loop import STOP_SPEED


def stop_frame(linear_x: np.ndarray) -> int | None:
    """The first frame after the last forward command (``linear_x`` above the closed loop's
    ``STOP_SPEED``), or None if the episode never drives forward or never stops within its
    frames."""
    forward = np.flatnonzero(np.asarray(linear_x) > STOP_SPEED)
    if not len(forward) or forward[-1] + 1 >= len(linear_x):
        return None
    return int(forward[-1] + 1)


def readout(
    x: np.ndarray, y: np.ndarray, train: np.ndarray, components: int = 512, seed: int = 0
) -> dict[str, float]:
    """Train and held-out accuracy of a logistic read-out of ``y`` from ``x`` fitted on the rows
    ``train`` (a boolean mask): standardised inputs, PCA to at most ``components`` dimensions,
    the L2 weight chosen by 5-fold cross-validation on the training rows alone."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = x.reshape(len(x), -1).astype(np.float64)
    n = min(components, int(train.sum()) - 1, x.shape[1])
    model = make_pipeline(
        StandardScaler(),
        PCA(n_components=n, random_state=seed),
        LogisticRegressionCV(
            Cs=np.logspace(-4, 2, 7).tolist(),
            cv=5,
            max_iter=5000,
            l1_ratios=(0.0,),
            scoring="accuracy",
            use_legacy_attributes=False,
        ),
    )
    model.fit(x[train], y[train])
    return {
        "train": float((model.predict(x[train]) == y[train]).mean()),
        "held_out": float((model.predict(x[~train]) == y[~train]).mean()),
    }


def _pairs(data: str | Path, episodes: int, gaps: list[int]) -> np.ndarray:
    """Frames of the stop and of each gap before it, per usable recorded episode: (episodes,
    1 + len(gaps), H, W, 3) uint8, read as training reads them (the file's channel order)."""
    from mobile_vla.config import DataConfig
    from mobile_vla.data.episodes import derived_of, load_episodes
    from mobile_vla.data.frame_cache import DirectFrames

    cfg = DataConfig(path=str(data))
    x = cfg.action_names.index("linear_x")
    recorded = derived_of(load_episodes(cfg))[0]
    recorded = [ep for ep in recorded if ep.attrs.get("driven_by", "expert") == "expert"]
    size = recorded[0].image_shape[:2] if recorded else (1, 1)  # none: refused below
    source = DirectFrames(size, channel_order=cfg.channel_order)
    rows: list[np.ndarray] = []
    for ep in recorded:
        if len(rows) >= episodes:
            break
        stop = stop_frame(ep.actions[:, x])
        if stop is not None and stop - max(gaps) >= 0:
            rows.append(source.window(ep, [stop - g for g in (0, *gaps)]))
    if len(rows) < 8:
        raise MobileVLAError(
            f"stop probe: '{data}' has {len(rows)} expert episodes that stop at least "
            f"{max(gaps)} frames after their first frame; it needs >= 8"
        )
    return np.stack(rows)


def _vision_tokens(frames: np.ndarray, config: str) -> np.ndarray:
    """The frozen vision tower's tokens (fusion width) of each frame, shipped weights."""
    import torch

    from mobile_vla.config import load_config
    from mobile_vla.data.normalization import ActionStats
    from mobile_vla.training.runs import build_policy

    cfg = load_config(config, ["train_setup.strategy=frozen"])
    stats = ActionStats.from_arrays(["linear_x"], [np.zeros((2, 1), np.float32)])
    backbone = build_policy(cfg, stats)[0].backbone.eval()
    flat = torch.from_numpy(frames.reshape(-1, *frames.shape[2:])).permute(0, 3, 1, 2)
    out = []
    with torch.no_grad():
        for s in range(0, len(flat), 256):
            pixels = backbone.preprocess(flat[s : s + 256])
            out.append(backbone.image_features(pixels).float().numpy())
    tokens = np.concatenate(out)
    return tokens.reshape(*frames.shape[:2], -1)


def probe_stop(
    data: str | Path,
    episodes: int = 600,
    gaps: tuple[int, ...] = (1, 2, 4),
    held_out: float = 0.25,
    seed: int = 0,
    config: str = "configs/builtin_case4.yaml",
    components: int = 512,
) -> dict[str, Any]:
    """Every read-out of the module docstring."""
    gaps = sorted({int(g) for g in gaps})
    if not gaps or gaps[0] < 1:
        raise MobileVLAError(f"stop probe: --gaps must be >= 1, got {gaps}")
    frames = _pairs(data, episodes, list(gaps))  # stop, then each gap before it
    n = len(frames)
    rng = np.random.default_rng(seed)
    held = np.zeros(n, bool)
    held[rng.permutation(n)[: max(2, round(n * held_out))]] = True
    features = {"vision tokens": _vision_tokens(frames, config), "pixels": frames / 255.0}
    y = np.r_[np.ones(n, int), np.zeros(n, int)]  # rows: each stop frame, then its gap frame
    train = np.r_[~held, ~held]
    result: dict[str, Any] = {"episodes": n, "held_out_episodes": int(held.sum()), "gaps": {}}
    for i, gap in enumerate(gaps, start=1):
        pairs = {name: np.r_[f[:, 0], f[:, i]] for name, f in features.items()}
        row = {name: readout(x, y, train, components, seed) for name, x in pairs.items()}
        # negative control: each episode's two frames keep their pairing, the label is a coin
        flip = rng.integers(0, 2, n).astype(bool)
        shuffled = np.r_[np.where(flip, 0, 1), np.where(flip, 1, 0)]
        row["shuffled labels"] = readout(pairs["vision tokens"], shuffled, train, components, seed)
        result["gaps"][str(gap)] = row
    return result


def format_stop_probe(result: dict[str, Any]) -> list[str]:
    lines = [
        f"stop frame against the frame GAP steps before it ({result['episodes']} expert "
        f"episodes, {result['held_out_episodes']} held out; chance 0.5): train / held-out"
    ]
    for gap, row in result["gaps"].items():
        cells = ", ".join(
            f"{name} {r['train']:.3f} / {r['held_out']:.3f}" for name, r in row.items()
        )
        lines.append(f"  gap {gap} ({float(gap) * 11.5:.1f} cm): {cells}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mobile_vla.analysis.stop_probe")
    p.add_argument("data", type=Path, help="episode folder (collect's expert episodes)")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--gaps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="configs/builtin_case4.yaml")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    result = probe_stop(
        args.data, args.episodes, tuple(args.gaps), seed=args.seed, config=args.config
    )
    print("\n".join(format_stop_probe(result)))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
