"""Augmentations applied identically to every frame of a sample's window.

Mirroring changes three things together: the image is flipped left-right, ``linear_y`` and
``angular_z`` are negated, and ``left``/``right`` are swapped in the instruction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mobile_vla.config import AugmentConfig
from mobile_vla.data.hdf5 import swap_left_right

MIRROR_NEGATED = ("linear_y", "angular_z")


@dataclass
class Augmented:
    frames: np.ndarray  # uint8 (W, H, W, 3)
    actions: np.ndarray  # physical units, (N, D)
    instruction: str
    mirrored: bool


def mirror_sign(action_names: Sequence[str]) -> np.ndarray:
    """+1/-1 per action column: which columns mirroring negates."""
    return np.array([-1.0 if n in MIRROR_NEGATED else 1.0 for n in action_names], np.float32)


def mirror(
    frames: np.ndarray, actions: np.ndarray, instruction: str, action_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, str]:
    return (
        np.ascontiguousarray(frames[..., ::-1, :]),
        actions * mirror_sign(action_names),
        swap_left_right(instruction),
    )


def color_jitter(frames: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation factors drawn once per window from [1-s, 1+s]."""
    b, c, s = rng.uniform(1 - strength, 1 + strength, size=3)
    x = frames.astype(np.float32) * b
    mean = x.mean(axis=(-3, -2, -1), keepdims=True)
    x = (x - mean) * c + mean
    gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = (x - gray[..., None]) * s + gray[..., None]
    return np.clip(x, 0, 255).astype(np.uint8)


def random_shift(frames: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """Pad by ``pad`` pixels (edge replicate) and crop back at one random offset per window."""
    h, w = frames.shape[-3:-1]
    padded = np.pad(frames, [(0, 0), (pad, pad), (pad, pad), (0, 0)], mode="edge")
    dy, dx = rng.integers(0, 2 * pad + 1, size=2)
    return np.ascontiguousarray(padded[:, dy : dy + h, dx : dx + w])


def augment(
    frames: np.ndarray,
    actions: np.ndarray,
    instruction: str,
    action_names: Sequence[str],
    cfg: AugmentConfig,
    rng: np.random.Generator,
) -> Augmented:
    mirrored = bool(cfg.mirror_prob > 0 and rng.random() < cfg.mirror_prob)
    if mirrored:
        frames, actions, instruction = mirror(frames, actions, instruction, action_names)
    if cfg.shift_pixels > 0:
        frames = random_shift(frames, cfg.shift_pixels, rng)
    if cfg.color_jitter > 0:
        frames = color_jitter(frames, cfg.color_jitter, rng)
    return Augmented(frames, actions, instruction, mirrored)
