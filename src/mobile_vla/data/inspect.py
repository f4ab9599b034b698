"""``mobile-vla inspect``: validate a dataset folder and summarise it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mobile_vla.data.episodes import ScanResult


@dataclass
class DatasetSummary:
    scan: ScanResult
    action_names: Sequence[str]

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
            "instructions": dict(Counter(e.instruction for e in eps).most_common()),
            "actions": {},
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
        ]
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
        lines.append(f"instructions ({len(j['instructions'])} distinct):")
        for text, n in list(j["instructions"].items())[:20]:
            lines.append(f"  {n:5d}  {text}")
        if len(j["instructions"]) > 20:
            lines.append(f"  ... and {len(j['instructions']) - 20} more")
        if j["bad_files"]:
            lines.append(f"bad files ({len(j['bad_files'])}):")
            lines.extend(f"  {b['file']}: {b['problem']}" for b in j["bad_files"])
        return "\n".join(lines)


def _describe(values: Sequence[int]) -> dict[str, float]:
    arr = np.asarray(values)
    return {"min": int(arr.min()), "median": float(np.median(arr)), "max": int(arr.max())}


def _kv(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items()) or "-"
