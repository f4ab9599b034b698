"""What training, evaluation and analysis share, without Lightning: the learning-rate
schedule, batch collation and the architecture check of a checkpoint (the inference path
imports this, not :mod:`mobile_vla.training.module`)."""

from __future__ import annotations

import math
from typing import Any

import torch

from mobile_vla.config import Config
from mobile_vla.errors import ConfigError


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
