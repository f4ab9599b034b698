"""One study cell's result, typed: what the report reads of a finished run folder.

``results.json`` stores each cell as :meth:`CellResult.to_json` gives it (the study resumes from
that file); the report reads it back with :meth:`CellResult.from_json` and then uses fields,
not string paths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mobile_vla.evaluation.results import ClosedLoopSummary, LearningCurve, OfflineMetrics
from mobile_vla.training.common import TrainStats


@dataclass(frozen=True)
class CellKey:
    strategy: str
    pretrained: bool
    train_episodes: int  # 0: all
    seed: int | None = None

    @property
    def group(self) -> tuple[str, bool, int]:
        """The cells that differ only by seed share it."""
        return (self.strategy, self.pretrained, self.train_episodes)


@dataclass(frozen=True)
class CellResult:
    key: CellKey
    run: str = ""
    train_used: int | None = None  # training episodes after the split
    val_used: int | None = None
    offline: OfflineMetrics | None = None
    closed_loop: ClosedLoopSummary | None = None
    curve: LearningCurve | None = field(default=None, repr=False)  # at closed_loop.curve_steps
    trainable_params: int | None = None
    total_params: int | None = None
    peak_memory_bytes: int | None = None
    peak_memory_kind: str | None = None
    train_time_s: float | None = None
    train_samples_per_s: float | None = None
    feature_cache: Any = None
    budget: dict[str, Any] | None = None  # what the arm was given: study.budgets
    language: dict[str, Any] | None = None  # metrics.json's language_reliance

    @classmethod
    def from_run(cls, run: Path, key: CellKey) -> CellResult:
        """What the report needs from a finished run folder."""
        metrics = json.loads((run / "metrics.json").read_text())
        stats = TrainStats.load(run)
        params = json.loads((run / "params.json").read_text())
        table = params.get("params", {}).get("all", {})
        split = json.loads((run / "split.json").read_text())
        from mobile_vla.study.budgets import run_budget

        return cls.from_json(
            {
                "key": key.__dict__,
                "run": str(run),
                "episodes": {"train": len(split["train"]), "val": len(split["val"])},
                "offline": metrics.get("offline"),
                "closed_loop": metrics.get("closed_loop"),
                "curve": metrics.get("curve"),
                "trainable_params": table.get("trainable"),
                "total_params": table.get("total"),
                "peak_memory_bytes": stats.peak_memory_bytes,
                "peak_memory_kind": stats.peak_memory_kind,
                "train_time_s": stats.wall_time_s,
                "train_samples_per_s": stats.train_samples_per_s,
                "feature_cache": stats.feature_cache,
                "budget": run_budget(run, metrics, stats, params, len(split["train"])),
                "language": metrics.get("language_reliance"),
            }
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "key": dict(self.key.__dict__),
            "run": self.run,
            "episodes": {"train": self.train_used, "val": self.val_used},
            "offline": self.offline.to_json() if self.offline else {},
            "closed_loop": self.closed_loop.to_json() if self.closed_loop else None,
            "curve": self.curve.to_json() if self.curve else None,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_memory_kind": self.peak_memory_kind,
            "train_time_s": self.train_time_s,
            "train_samples_per_s": self.train_samples_per_s,
            "feature_cache": self.feature_cache,
            "budget": self.budget,
            "language": self.language,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CellResult:
        k = d.get("key", {})
        key = CellKey(
            k.get("strategy", "?"),
            bool(k.get("pretrained", True)),
            int(k.get("train_episodes", 0)),
            k.get("seed"),
        )
        episodes = d.get("episodes") or {}
        return cls(
            key,
            str(d.get("run", "")),
            episodes.get("train"),
            episodes.get("val"),
            OfflineMetrics.from_json(d["offline"]) if d.get("offline") else None,
            ClosedLoopSummary.from_json(d["closed_loop"]) if d.get("closed_loop") else None,
            LearningCurve.from_json(d["curve"]) if d.get("curve") else None,
            d.get("trainable_params"),
            d.get("total_params"),
            d.get("peak_memory_bytes"),
            d.get("peak_memory_kind"),
            d.get("train_time_s"),
            d.get("train_samples_per_s"),
            d.get("feature_cache"),
            d.get("budget"),
            d.get("language"),
        )
