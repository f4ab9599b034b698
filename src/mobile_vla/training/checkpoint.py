"""Checkpoints as safetensors + JSON: nothing is ever unpickled.

A checkpoint is a folder::

    tensors.safetensors   every tensor of the state (model tensors, optimizer moments, RNG)
    state.json            the structure, with {"__tensor__": key} where a tensor was

It is written to a temporary folder and renamed into place, so a crash never leaves a
half-written ``last`` or ``best``. :class:`SafeCheckpointIO` lets Lightning save and restore
its full training state (optimizer, schedulers, loops) through this format.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.plugins.io import CheckpointIO
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mobile_vla.errors import MobileVLAError

TENSORS = "tensors.safetensors"
STATE = "state.json"


class CheckpointError(MobileVLAError):
    pass


def encode(obj: Any, tensors: dict[str, torch.Tensor], where: str = "") -> Any:
    """Python structure with tensors -> JSON-able structure; tensors go to ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"__ndarray__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {
            "__items__": [
                [encode(k, tensors, where), encode(v, tensors, f"{where}.{k}")]
                for k, v in obj.items()
            ]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, where) for v in obj]}
    if isinstance(obj, list):
        return [encode(v, tensors, where) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint value at '{where}' has unsupported type {type(obj).__name__}")


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {decode(k, tensors): decode(v, tensors) for k, v in obj["__items__"]}
        if "__float__" in obj:
            return float(obj["__float__"])
        return {k: decode(v, tensors) for k, v in obj.items()}
    return obj


def save_folder(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to checkpoint folder ``path`` atomically (replacing what was there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    structure = encode(state, tensors)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, str(tmp / TENSORS))
        (tmp / STATE).write_text(json.dumps(structure))
        for name in (TENSORS, STATE):
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_folder(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / STATE).is_file() or not (path / TENSORS).is_file():
        raise CheckpointError(f"checkpoint '{path}' is incomplete: expected {STATE} and {TENSORS}")
    try:
        structure = json.loads((path / STATE).read_text())
        tensors = load_file(str(path / TENSORS))
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint '{path}' is corrupt ({str(exc)[:120]})") from None
    return decode(structure, tensors)


class SafeCheckpointIO(CheckpointIO):
    """Lightning's checkpoint I/O through :func:`save_folder` / :func:`load_folder`."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        save_folder(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_folder(path)

    def remove_checkpoint(self, path: Any) -> None:
        shutil.rmtree(path, ignore_errors=True)
