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


#: what a comparison keeps of each space's measures (``compare.json``)
COMPARISON_MEASURES = ("cka", "cka_kind", "cosine", "euclidean", "kl", "correlation", "dims")


@dataclass(frozen=True)
class SpaceComparison:
    """How two runs' representations relate in one space (context or latent): linear CKA
    and its kind, paired cosine and euclidean distances, KL, correlation (each as
    ``analysis.compare`` reports it) and the dimensions compared."""

    cka: float | None = None
    cka_kind: str | None = None
    cosine: Any = None
    euclidean: Any = None
    kl: Any = None
    correlation: Any = None
    dims: Any = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SpaceComparison:
        return cls(**{k: d.get(k) for k in COMPARISON_MEASURES})

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in COMPARISON_MEASURES}


@dataclass(frozen=True)
class Comparison:
    """The frozen-vs-LoRA representation comparison of a pair of cells."""

    runs: list[str]
    folder: str
    context: SpaceComparison
    latent: SpaceComparison
    samples: int | None = None
    key: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Comparison:
        return cls(
            list(d.get("runs", [])),
            str(d.get("folder", "")),
            SpaceComparison.from_json(d.get("context") or {}),
            SpaceComparison.from_json(d.get("latent") or {}),
            d.get("samples"),
            dict(d.get("key") or {}),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "folder": self.folder,
            "context": self.context.to_json(),
            "latent": self.latent.to_json(),
            "samples": self.samples,
            "key": self.key,
        }


@dataclass
class StudyResults:
    """``results.json``: every finished cell and comparison (written after each one, so an
    interrupted study resumes), the seconds of each phase, the study's settings and, once
    written, the report's summary."""

    FORMAT = "mobile-vla-study"
    VERSION = 1

    cells: dict[str, CellResult] = field(default_factory=dict)
    compare: dict[str, Comparison] = field(default_factory=dict)
    phases: dict[str, Any] = field(default_factory=dict)
    study: dict[str, Any] = field(default_factory=dict)  # study.yaml's resolved keys
    base_config: str = ""
    wall_time_s_this_invocation: float | None = None
    report: dict[str, Any] | None = None  # the report's summary (study.report)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StudyResults:
        return cls(
            {k: CellResult.from_json(v) for k, v in (d.get("cells") or {}).items()},
            {k: Comparison.from_json(v) for k, v in (d.get("compare") or {}).items()},
            dict(d.get("phases") or {}),
            dict(d.get("study") or {}),
            str(d.get("base_config") or ""),
            d.get("wall_time_s_this_invocation"),
            d.get("report"),
        )

    @classmethod
    def of(cls, results: StudyResults | dict[str, Any]) -> StudyResults:
        return results if isinstance(results, StudyResults) else cls.from_json(results)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": self.FORMAT,
            "version": self.VERSION,
            "cells": {k: v.to_json() for k, v in self.cells.items()},
            "compare": {k: v.to_json() for k, v in self.compare.items()},
            "phases": self.phases,
            "study": self.study,
            "base_config": self.base_config,
        }
        if self.wall_time_s_this_invocation is not None:
            out["wall_time_s_this_invocation"] = self.wall_time_s_this_invocation
        if self.report is not None:
            out["report"] = self.report
        return out
