"""Predicted action dimensions -> the robot's command, [linear_x, linear_y, angular_z].

One mapping for the policy runtime (one action a step) and the robot side (a reply's chunk);
numpy only, so the robot side needs no torch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mobile_vla.config import ACTION_NAMES


def full_commands(chunk: Any, dims: Sequence[str]) -> np.ndarray:
    """A chunk of the predicted dimensions (N, D), column j named ``dims[j]`` -> (N, 3) robot
    commands in ``ACTION_NAMES`` order, the dimensions not predicted 0."""
    arr = np.asarray(chunk, np.float32).reshape(len(chunk), -1)
    if arr.shape[1] != len(dims):
        raise ValueError(f"{arr.shape[1]} predicted values per action for {len(dims)} dims")
    out = np.zeros((len(arr), len(ACTION_NAMES)), np.float32)
    for j, name in enumerate(dims):
        if name in ACTION_NAMES:
            out[:, ACTION_NAMES.index(name)] = arr[:, j]
    return out


def to_command(action: Any, dims: Sequence[str]) -> np.ndarray:
    """One action's predicted dimensions -> the robot's 3 commands."""
    return full_commands(np.asarray(action, np.float32)[None], dims)[0]
