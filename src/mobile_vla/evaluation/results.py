"""What ``eval`` measures, as typed, frozen records.

``metrics.json`` keeps its sections (``offline``, ``closed_loop``, ``closed_loop_expert_start``)
with the keys ``shared/specs/metrics.md`` names; these classes are how the code reads and
writes them: ``to_json`` gives the section, ``from_json`` reads it back (a file written by an
older version, without the optional keys, reads too). The study report, the learning curve
and the CLI read fields (``summary.by_side["left"].successes``), never string paths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from mobile_vla.errors import MobileVLAError


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion. It contains the observed
    proportion, as the Wilson interval does in exact arithmetic (in floating point 48/48's
    upper bound came out 0.999..., below the rate, and a plot's error bar went negative)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _need(d: Any, key: str, what: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        got = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise MobileVLAError(f"{what}: key '{key}' is missing (got {got})")
    return d[key]


@dataclass(frozen=True)
class SuccessCount:
    """Closed-loop successes of one group of episodes (all, one side, one layout, ...)."""

    episodes: int
    successes: int
    success_ci95: tuple[float, float]
    collision_rate: float | None = None
    mean_steps_to_success: float | None = None

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.episodes if self.episodes else None

    def to_json(self) -> dict[str, Any]:
        return {
            "episodes": self.episodes,
            "successes": self.successes,
            "success_rate": self.success_rate,
            "success_ci95": list(self.success_ci95),
            "collision_rate": self.collision_rate,
            "mean_steps_to_success": self.mean_steps_to_success,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SuccessCount:
        what = "closed-loop result"
        n, k = int(_need(d, "episodes", what)), int(_need(d, "successes", what))
        lo, hi = d.get("success_ci95") or wilson_interval(k, n)
        return cls(
            n,
            k,
            (float(lo), float(hi)),
            d.get("collision_rate"),
            d.get("mean_steps_to_success"),
        )


def most_frequent_first(counts: Mapping[str, int]) -> dict[str, int]:
    """Counts (of failure kinds) as a dict, the most frequent first, ties by name."""
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


GROUPS = ("side", "layout", "distance")
# how a closed loop was run: optional fields of ClosedLoopSummary, keys of its JSON section
SETTINGS = (
    "seed",
    "checkpoint",
    "chunk_mode",
    "chunk_k",
    "ensemble_decay",
    "step_limit",
    "expert_steps",
)


class _Overall:
    """The figures of a result's ``overall`` count, read as the result's own."""

    overall: SuccessCount

    @property
    def episodes(self) -> int:
        return self.overall.episodes

    @property
    def successes(self) -> int:
        return self.overall.successes

    @property
    def success_rate(self) -> float | None:
        return self.overall.success_rate

    @property
    def success_ci95(self) -> tuple[float, float]:
        return self.overall.success_ci95

    @property
    def collision_rate(self) -> float | None:
        return self.overall.collision_rate


@dataclass(frozen=True)
class ClosedLoopSummary(_Overall):
    """A closed-loop evaluation: all episodes, the same split by side / layout / distance, and
    how it was run (absent where the caller did not say: ``closed_loop`` alone knows only the
    episodes; ``evaluate_run_closed_loop`` adds the settings and the per-episode detail)."""

    overall: SuccessCount
    by_side: dict[str, SuccessCount]
    by_layout: dict[str, SuccessCount]
    by_distance: dict[str, SuccessCount]
    seed: int | None = None
    checkpoint: str | None = None
    chunk_mode: str | None = None
    chunk_k: int | None = None
    ensemble_decay: float | None = None
    step_limit: int | None = None
    expert_steps: int | None = None
    episodes_detail: list[dict[str, Any]] = field(default_factory=list, repr=False)
    failures: dict[str, int] = field(default_factory=dict)
    """Failed episodes by how they failed ("hit target", "stopped outside the goal", ...:
    ``EpisodeResult.failure``), most frequent first; empty in results written before it."""
    stops: dict[str, Any] = field(default_factory=dict)
    """Where the episodes that ended stopped stopped against the goal
    (``closed_loop.stop_placement``: ``slope``, ``offset_by_distance``); empty when fewer than
    3 stopped, or in results written before it."""

    def side(self, name: str) -> SuccessCount | None:
        return self.by_side.get(name)

    def with_settings(self, **settings: Any) -> ClosedLoopSummary:
        return replace(self, **settings)

    def to_json(self) -> dict[str, Any]:
        out = self.overall.to_json()
        for g in GROUPS:
            out[f"by_{g}"] = {k: v.to_json() for k, v in getattr(self, f"by_{g}").items()}
        out.update(_drop_none({k: getattr(self, k) for k in SETTINGS}))
        out["failures"] = dict(self.failures)
        out["stops"] = dict(self.stops)
        if self.episodes_detail:
            out["episodes_detail"] = self.episodes_detail
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ClosedLoopSummary:
        groups = {
            f"by_{g}": {k: SuccessCount.from_json(v) for k, v in d.get(f"by_{g}", {}).items()}
            for g in GROUPS
        }
        return cls(
            SuccessCount.from_json(d),
            **groups,
            **{k: d.get(k) for k in SETTINGS},
            episodes_detail=list(d.get("episodes_detail", [])),
            failures={str(k): int(v) for k, v in (d.get("failures") or {}).items()},
            stops=dict(d.get("stops") or {}),
        )


@dataclass(frozen=True)
class CurvePoint(_Overall):
    """One checkpoint of a learning curve: its closed-loop success on the curve's scenes."""

    checkpoint: str
    step: int
    overall: SuccessCount
    by_side: dict[str, SuccessCount]

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "step": self.step,
            **self.overall.to_json(),
            "by_side": {k: v.to_json() for k, v in self.by_side.items()},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CurvePoint:
        return cls(
            str(d.get("checkpoint", "")),
            int(_need(d, "step", "curve point")),
            SuccessCount.from_json(d),
            {k: SuccessCount.from_json(v) for k, v in d.get("by_side", {}).items()},
        )


@dataclass(frozen=True)
class LearningCurve:
    """Closed-loop success of a run's checkpoints on the same held-out scenes
    (``metrics.json["curve"]``)."""

    seed: int | None
    episodes: int
    chunk_mode: str
    points: list[CurvePoint]

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "episodes": self.episodes,
            "chunk_mode": self.chunk_mode,
            "points": [p.to_json() for p in self.points],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LearningCurve:
        return cls(
            d.get("seed"),
            int(_need(d, "episodes", "learning curve")),
            str(d.get("chunk_mode", "first")),
            [CurvePoint.from_json(p) for p in _need(d, "points", "learning curve")],
        )


@dataclass(frozen=True)
class DirectionAccuracy:
    """sign(pred linear_y) == sign(target linear_y) where |target| > ``threshold``; ``value``
    is None with a ``reason`` when the policy does not predict linear_y."""

    value: float | None
    count: int = 0
    threshold: float | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.reason:
            return {"value": None, "reason": self.reason}
        return {"value": self.value, "count": self.count, "threshold": self.threshold}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DirectionAccuracy:
        return cls(d.get("value"), int(d.get("count", 0)), d.get("threshold"), d.get("reason"))


@dataclass(frozen=True)
class SensitivityHistogram:
    edges: list[float]
    counts: list[int]


@dataclass(frozen=True)
class InstructionSensitivity:
    """First-action linear_y with the instruction's left/right swapped: mean |difference|, the
    share of sign flips, and the distribution of |difference| (quantiles, 20-bin histogram)."""

    mean_abs_diff: float | None
    sign_flip_rate: float | None = None
    count: int = 0
    quantiles: dict[str, float] = field(default_factory=dict)
    histogram: SensitivityHistogram | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.reason:
            return {"mean_abs_diff": None, "reason": self.reason}
        out: dict[str, Any] = {
            "mean_abs_diff": self.mean_abs_diff,
            "sign_flip_rate": self.sign_flip_rate,
            "count": self.count,
        }
        if self.quantiles:
            out["quantiles"] = dict(self.quantiles)
        if self.histogram is not None:
            out["histogram"] = {"edges": self.histogram.edges, "counts": self.histogram.counts}
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> InstructionSensitivity:
        h = d.get("histogram")
        return cls(
            d.get("mean_abs_diff"),
            d.get("sign_flip_rate"),
            int(d.get("count", 0)),
            dict(d.get("quantiles", {})),
            SensitivityHistogram(list(h["edges"]), list(h["counts"])) if h else None,
            d.get("reason"),
        )


@dataclass(frozen=True)
class OfflineMetrics:
    """The offline metrics of ``shared/specs/metrics.md`` on one split of a run, in physical
    units; ``rmse`` / ``mae`` per action dimension and ``all``. The run's identity (split,
    episodes, seed, checkpoint, run) is None for metrics computed on a bare dataset."""

    val_loss: float | None
    rmse: dict[str, float]
    mae: dict[str, float]
    samples: int
    valid_steps: int
    direction_accuracy: DirectionAccuracy
    instruction_sensitivity: InstructionSensitivity
    split: str | None = None
    episodes: int | None = None
    seed: int | None = None
    checkpoint: str | None = None
    run: str | None = None

    def of_run(self, **identity: Any) -> OfflineMetrics:
        return replace(self, **identity)

    def to_json(self) -> dict[str, Any]:
        return {
            "val_loss": self.val_loss,
            "rmse": dict(self.rmse),
            "mae": dict(self.mae),
            "valid_steps": self.valid_steps,
            "samples": self.samples,
            "direction_accuracy": self.direction_accuracy.to_json(),
            "instruction_sensitivity": self.instruction_sensitivity.to_json(),
            **_drop_none(
                {
                    "split": self.split,
                    "episodes": self.episodes,
                    "seed": self.seed,
                    "checkpoint": self.checkpoint,
                    "run": self.run,
                }
            ),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> OfflineMetrics:
        return cls(
            d.get("val_loss"),
            dict(d.get("rmse", {})),
            dict(d.get("mae", {})),
            int(d.get("samples", 0)),
            int(d.get("valid_steps", 0)),
            DirectionAccuracy.from_json(d.get("direction_accuracy", {"value": None})),
            InstructionSensitivity.from_json(
                d.get("instruction_sensitivity", {"mean_abs_diff": None})
            ),
            d.get("split"),
            d.get("episodes"),
            d.get("seed"),
            d.get("checkpoint"),
            d.get("run"),
        )
