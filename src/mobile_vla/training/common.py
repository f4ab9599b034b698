"""What training, evaluation and analysis share, without Lightning: the learning-rate
schedule, batch collation and the architecture check of a checkpoint (the inference path
imports this, not :mod:`mobile_vla.training.module`)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from mobile_vla.config import Config
from mobile_vla.errors import ConfigError


@dataclass(frozen=True)
class TrainStats:
    """What a finished training measured (``train_stats.json``): throughput in the steady
    state (the loop's and the optimizer step's, samples = windows x supervised frames), the
    steps, the wall time and its timeline, peak memory, the feature cache and the precision."""

    wall_time_s: float = 0.0
    global_step: int = 0
    epochs: int = 0
    train_samples_per_s: float | None = None
    train_step_samples_per_s: float | None = None
    train_windows_per_s: float | None = None
    train_step_windows_per_s: float | None = None
    steady_state_batches: int = 0
    windows_seen: int = 0
    #: (optimizer step, seconds since training began) at each kept step and validation
    timeline: list[list[float]] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    peak_memory_kind: str | None = None  # cpu_rss or cuda_allocated
    feature_cache: Any = None  # what the cache did (built, opened, off), in words
    feature_cache_s: float = 0.0  # building or opening it, before training
    precision: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainStats:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def load(cls, run: str | Path) -> TrainStats:
        """``RUN/train_stats.json``."""
        path = Path(run) / "train_stats.json"
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))


def warmup_cosine(step: int, warmup: int, total: int, min_scale: float) -> float:
    """Linear warm-up from 0 to 1 over ``warmup`` steps, then cosine down to ``min_scale``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_scale + (1 - min_scale) * 0.5 * (1 + math.cos(math.pi * progress))


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], (bool, int, float)):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


def architecture(cfg: Config) -> dict[str, Any]:
    """What must match for a checkpoint to load into a model."""
    return {
        "backbone": cfg.backbone.name,
        "backbone_path": cfg.backbone.path,
        "history": cfg.backbone.history,
        "n_action_tokens": cfg.backbone.n_action_tokens,
        "head": cfg.head.type,
        "action_space": cfg.head.action_space,
        "action_dims": list(cfg.data.action_dims),
        "window_size": cfg.data.window_size,
        "fwd_pred_next_n": cfg.data.fwd_pred_next_n,
    }


def check_architecture(
    checkpoint: dict[str, Any], cfg: Config, model_state: dict[str, torch.Tensor], source: str
) -> None:
    saved = checkpoint.get("architecture", {})
    mine = architecture(cfg)
    diff = [
        f"{k}: checkpoint {saved.get(k)!r} vs config {v!r}"
        for k, v in mine.items()
        if k in saved and saved[k] != v
    ]
    state = checkpoint.get("state_dict", {})
    unexpected = sorted(set(state) - set(model_state))
    shapes = [
        f"{k}: {tuple(v.shape)} vs {tuple(model_state[k].shape)}"
        for k, v in state.items()
        if k in model_state and v.shape != model_state[k].shape
    ]
    if diff or unexpected or shapes:
        detail = "; ".join(
            diff + shapes[:3] + ([f"unexpected tensors {unexpected[:3]}"] if unexpected else [])
        )
        raise ConfigError(f"{source}: the checkpoint was made for another architecture ({detail})")
