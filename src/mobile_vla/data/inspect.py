"""``mobile-vla inspect``: validate a dataset folder and summarise it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mobile_vla.data.episodes import ScanResult


@dataclass
class DatasetSummary:
    scan: ScanResult
    action_names: Sequence[str]
    channel_order: str = "auto"

    def to_json(self) -> dict[str, Any]:
        eps = self.scan.episodes
        frames = [e.num_frames for e in eps]
        out: dict[str, Any] = {
            "folder": str(self.scan.folder),
            "pattern": self.scan.pattern,
            "files": len(eps) + len(self.scan.bad),
            "episodes": len(eps),
            "frames": int(sum(frames)),
            "frames_per_episode": _describe(frames) if frames else {},
            "scenarios": dict(sorted(Counter(e.scenario for e in eps).items())),
            "sides": dict(sorted(Counter(e.side or "none" for e in eps).items())),
            "distances": dict(sorted(Counter(e.distance or "none" for e in eps).items())),
            "image_sizes": {
                f"{h}x{w}": n
                for (h, w, _), n in sorted(Counter(e.image_shape for e in eps).items())
            },
            "instruction_sources": dict(Counter(e.instruction_source for e in eps)),
            "channel_orders": dict(
                sorted(Counter(_order_label(e, self.channel_order) for e in eps).items())
            ),
            "instructions": dict(Counter(e.instruction for e in eps).most_common()),
            "actions": {},
            "speeds": dict(sorted(Counter(_speed(e.actions) for e in eps).items())),
            "motionless_episodes": [e.path.name for e in eps if not np.abs(e.actions).any()],
            "bad_files": [{"file": e.path.name, "problem": e.problem} for e in self.scan.bad],
        }
        if eps:
            data = np.concatenate([e.actions for e in eps], axis=0)
            for d, name in enumerate(self.action_names):
                col = data[:, d]
                values, counts = np.unique(np.round(col, 4), return_counts=True)
                out["actions"][name] = {
                    "min": float(col.min()),
                    "max": float(col.max()),
                    "mean": float(col.mean()),
                    "std": float(col.std()),
                    "q01": float(np.quantile(col, 0.01)),
                    "q99": float(np.quantile(col, 0.99)),
                    "distinct_values": len(values),
                    "top_values": {
                        f"{v:g}": int(c)
                        for v, c in sorted(
                            zip(values.tolist(), counts.tolist(), strict=True),
                            key=lambda vc: -vc[1],
                        )[:5]
                    },
                }
        return out

    def to_text(self) -> str:
        j = self.to_json()
        lines = [
            f"dataset {j['folder']} ({j['pattern']}): {j['files']} files, "
            f"{j['episodes']} good episodes, {len(j['bad_files'])} bad",
            f"frames: {j['frames']} total"
            + (
                f"; per episode min {j['frames_per_episode']['min']}, median "
                f"{j['frames_per_episode']['median']:g}, max {j['frames_per_episode']['max']}"
                if j["frames_per_episode"]
                else ""
            ),
            "scenarios: " + _kv(j["scenarios"]),
            "sides: " + _kv(j["sides"]),
            "distances: " + _kv(j["distances"]),
            "image sizes: " + _kv(j["image_sizes"]),
            "instruction from: " + _kv(j["instruction_sources"]),
            "channel order: " + _kv(j["channel_orders"]),
        ]
        if any(k.startswith("rgb (assumed") for k in j["channel_orders"]):
            lines.append(
                "  note: files without a channel_order attribute are read as RGB; the robot's "
                "OpenCV collector stores BGR: pass --data.channel_order=bgr for its files "
                "(--sheet shows what the model sees)"
            )
        if j["actions"]:
            lines.append("actions:")
            lines.append(
                f"  {'dim':<10} {'min':>8} {'max':>8} {'mean':>8} {'std':>8} "
                f"{'q01':>8} {'q99':>8}  values"
            )
            for name, s in j["actions"].items():
                top = ", ".join(f"{v}x{c}" for v, c in s["top_values"].items())
                lines.append(
                    f"  {name:<10} {s['min']:8.3f} {s['max']:8.3f} {s['mean']:8.3f} "
                    f"{s['std']:8.3f} {s['q01']:8.3f} {s['q99']:8.3f}  "
                    f"{s['distinct_values']} distinct ({top})"
                )
        lines.append("speed (largest |action| per episode): " + _kv(j["speeds"]))
        moving = [k for k in j["speeds"] if k != "0"]
        if 1 < len(moving) <= 3:  # a few distinct key speeds, not continuous commands
            lines.append(
                f"  note: episodes were recorded at {len(moving)} speeds ({', '.join(moving)}; "
                "older recordings used 0.5): mixed, the policy learns a speed that is neither; "
                "train on one (data.pattern) or rescale the others"
            )
        if j["motionless_episodes"]:
            names = j["motionless_episodes"]
            lines.append(
                f"  note: {len(names)} episode(s) never move (every action is 0, e.g. only "
                f"stop_action): {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
            )
        lines.append(f"instructions ({len(j['instructions'])} distinct):")
        for text, n in list(j["instructions"].items())[:20]:
            lines.append(f"  {n:5d}  {text}")
        if len(j["instructions"]) > 20:
            lines.append(f"  ... and {len(j['instructions']) - 20} more")
        if j["bad_files"]:
            lines.append(f"bad files ({len(j['bad_files'])}):")
            lines.extend(f"  {b['file']}: {b['problem']}" for b in j["bad_files"])
        return "\n".join(lines)


def _speed(actions: np.ndarray) -> str:
    """The episode's largest |action| (2 decimals): 1.15 for today's teleop keys, 0.5 for
    older recordings, 0 for an episode that never moves."""
    return f"{round(float(np.abs(actions).max()), 2) if actions.size else 0.0:g}"


def _describe(values: Sequence[int]) -> dict[str, float]:
    arr = np.asarray(values)
    return {"min": int(arr.min()), "median": float(np.median(arr)), "max": int(arr.max())}


def _kv(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items()) or "-"


def _order_label(ep: Any, configured: str) -> str:
    from mobile_vla.data.frame_cache import stored_channel_order

    order = stored_channel_order(ep, configured)
    if configured != "auto":
        return f"{order} (data.channel_order)"
    if "channel_order" in ep.attrs:
        return f"{order} (file attribute)"
    return f"{order} (assumed, not recorded)"


def contact_sheet(
    episodes: Sequence[Any],
    out: str | Path,
    size: Sequence[int],
    channel_order: str = "auto",
    max_episodes: int = 24,
) -> Path:
    """A PNG with the first, middle and last frame of up to ``max_episodes`` episodes (one row
    each, labelled with the file and its instruction) exactly as the model sees them: converted
    to RGB per the channel order and resized to ``data.image_size``."""
    from PIL import Image, ImageDraw

    from mobile_vla.data.frame_cache import model_frames
    from mobile_vla.data.hdf5 import FrameReader
    from mobile_vla.io import atomic_path

    if not episodes:
        raise ValueError("no good episodes to show")
    h, w = int(size[0]), int(size[1])
    scale = max(1, 96 // max(h, w))  # small model inputs are enlarged to be seen
    th, tw = h * scale, w * scale
    label_w = 420
    rows = list(episodes)[:max_episodes]
    sheet = Image.new("RGB", (label_w + 3 * (tw + 4), len(rows) * (th + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, ep in enumerate(rows):
        t = ep.num_frames
        with FrameReader(ep.path) as reader:
            frames = model_frames(reader, ep, [0, t // 2, t - 1], (h, w), channel_order)
        y = r * (th + 4)
        draw.text((4, y + 2), ep.path.name[:64], fill="black")
        draw.text((4, y + 16), ep.instruction[:64], fill=(60, 60, 60))
        for c, frame in enumerate(frames):
            tile = Image.fromarray(frame).resize((tw, th), Image.NEAREST)
            sheet.paste(tile, (label_w + c * (tw + 4), y))
    out = Path(out)
    with atomic_path(out, suffix=".png") as tmp:
        sheet.save(tmp, format="PNG")
    return out
