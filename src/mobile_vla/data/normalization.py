"""Action normalization statistics (from the training split only) and the normalizer."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mobile_vla.errors import DataError
from mobile_vla.io import atomic_write_json

MODES = ("none", "minmax", "meanstd", "quantile", "bounds")
_STAT_KEYS = ("min", "max", "mean", "std", "q01", "q99")


@dataclass
class ActionStats:
    """Per-dimension statistics of the predicted action columns."""

    names: list[str]
    min: np.ndarray
    max: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray
    q99: np.ndarray
    count: int

    @classmethod
    def from_arrays(cls, names: Sequence[str], actions: Sequence[np.ndarray]) -> ActionStats:
        """``actions``: one (T, D) array per training episode, columns named by ``names``."""
        if not actions:
            raise DataError("cannot compute action statistics: the training split is empty")
        data = np.concatenate([np.asarray(a, dtype=np.float64) for a in actions], axis=0)
        return cls(
            names=list(names),
            min=data.min(0),
            max=data.max(0),
            mean=data.mean(0),
            std=data.std(0),
            q01=np.quantile(data, 0.01, axis=0),
            q99=np.quantile(data, 0.99, axis=0),
            count=int(data.shape[0]),
        )

    def to_json(self) -> dict:
        out: dict = {"names": self.names, "count": self.count}
        for key in _STAT_KEYS:
            out[key] = [float(v) for v in getattr(self, key)]
        return out

    @classmethod
    def from_json(cls, obj: dict, source: str = "stats") -> ActionStats:
        missing = [k for k in ("names", "count", *_STAT_KEYS) if k not in obj]
        if missing:
            raise DataError(f"normalization statistics '{source}' lack key(s) {missing}")
        n = len(obj["names"])
        arrays = {}
        for key in _STAT_KEYS:
            arr = np.asarray(obj[key], dtype=np.float64)
            if arr.shape != (n,):
                raise DataError(
                    f"normalization statistics '{source}': '{key}' must have {n} values"
                )
            arrays[key] = arr
        return cls(names=list(obj["names"]), count=int(obj["count"]), **arrays)

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> ActionStats:
        path = Path(path)
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"normalization statistics file '{path}' does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"normalization statistics file '{path}' is not valid JSON") from None
        return cls.from_json(obj, str(path))


class Normalizer:
    """Maps physical actions to the model's space and back.

    ``minmax``/``quantile`` map [lo, hi] to [-1, 1] (quantile clips outside [q01, q99]);
    ``meanstd`` z-scores; ``none`` is the identity; ``bounds`` clips to the fixed
    ``bounds = (lo, hi)`` of every dimension and maps them to [-1, 1], as RoboVLMs'
    ``norm_action`` with ``norm_min`` / ``norm_max`` does. Dimensions whose range is zero map
    to 0.
    """

    def __init__(
        self, stats: ActionStats, mode: str, bounds: tuple[float, float] = (-1.0, 1.0)
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"normalization mode must be one of {MODES}, got {mode!r}")
        self.stats, self.mode = stats, mode
        if mode == "bounds":
            lo = np.full(len(stats.names), float(bounds[0]))
            hi = np.full(len(stats.names), float(bounds[1]))
        elif mode == "minmax":
            lo, hi = stats.min, stats.max
        elif mode == "quantile":
            lo, hi = stats.q01, stats.q99
        else:
            lo, hi = stats.mean - stats.std, stats.mean + stats.std
        self._center = ((lo + hi) / 2).astype(np.float32)
        half = (hi - lo) / 2
        self._scale = np.where(half > 1e-8, half, 1.0).astype(np.float32)
        if mode == "meanstd":
            self._center = stats.mean.astype(np.float32)
        if mode == "none":
            self._center = np.zeros_like(self._center)
            self._scale = np.ones_like(self._scale)

    def normalize(self, actions: np.ndarray) -> np.ndarray:
        actions = np.asarray(actions, dtype=np.float32)
        if self.mode == "bounds":
            actions = np.clip(actions, self._center - self._scale, self._center + self._scale)
        out = (actions - self._center) / self._scale
        if self.mode == "quantile":
            out = np.clip(out, -1.0, 1.0)
        return out.astype(np.float32)

    def denormalize(self, actions: np.ndarray) -> np.ndarray:
        return (np.asarray(actions, dtype=np.float32) * self._scale + self._center).astype(
            np.float32
        )
