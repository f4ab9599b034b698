"""Checkpoints as safetensors + JSON: nothing is ever unpickled.

A checkpoint is a folder::

    tensors.safetensors   every tensor of the state (model tensors, optimizer moments, RNG)
    checksum.json         the sha256 of tensors.safetensors, verified on load
    state.json            the structure, with {"__tensor__": key} where a tensor was

It is written to a temporary folder and renamed into place, so a crash never leaves a
half-written ``last`` or ``best`` (see :func:`save_folder` for the crash between renames).
Loading refuses a file whose bytes changed and weights that are NaN or infinite.
:class:`SafeCheckpointIO` lets Lightning save and restore
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mobile_vla.errors import MobileVLAError
from mobile_vla.io import current_umask, file_sha256, fsync_dir

TENSORS = "tensors.safetensors"
STATE = "state.json"
CHECKSUM = "checksum.json"  # sha256 of TENSORS, written with it


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


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def is_complete(path: Path) -> bool:
    """Whether ``path`` holds both files of a checkpoint."""
    return (path / STATE).is_file() and (path / TENSORS).is_file()


def recover(path: str | Path) -> Path:
    """Finish a swap that a crash cut between its two renames: ``path`` is gone and its
    previous version waits, complete, as ``.<name>.old``; put it back."""
    path = Path(path)
    old = _old(path)
    if not path.exists() and old.is_dir() and is_complete(old):
        os.replace(old, path)
        fsync_dir(path.parent)
    return path


def save_folder(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to checkpoint folder ``path`` atomically (replacing what was there).

    The new version is written and fsynced in a temporary folder beside ``path``; the old
    version is moved to ``.<name>.old`` and the new one renamed into place, then the parent
    folder is fsynced. A crash between the two renames leaves both versions complete, and
    :func:`recover` (called by every load and save) puts the old one back; temporary folders
    that a crash left behind are removed by the next save."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    for stale in path.parent.glob(f".{path.name}.*"):
        if stale.is_dir() and stale != _old(path):
            shutil.rmtree(stale, ignore_errors=True)  # an interrupted write's temporary folder
    tensors: dict[str, torch.Tensor] = {}
    structure = encode(state, tensors)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700 whatever the umask
        save_file(tensors, str(tmp / TENSORS))
        (tmp / CHECKSUM).write_text(json.dumps({"sha256": file_sha256(tmp / TENSORS)}))
        (tmp / STATE).write_text(json.dumps(structure))
        for name in (TENSORS, CHECKSUM, STATE):
            os.chmod(tmp / name, 0o666 & ~current_umask())
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        old = None
        if path.exists():
            old = _old(path)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def saved_step(path: str | Path) -> int:
    """The optimizer step a checkpoint folder was saved at, from its JSON part alone (the
    tensors are not read: a learning curve asks it of every checkpoint before loading one)."""
    path = recover(path)
    try:
        return int(json.loads((path / STATE).read_text()).get("global_step", 0))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint '{path}': {STATE} is unreadable ({exc})") from None


SELECTED = "selected"  # checkpoints/selected: the kept checkpoint that drove best on validation


def selection_of(path: str | Path) -> dict[str, Any] | None:
    """How a ``checkpoints/selected`` folder was chosen (``mobile-vla curve --select``: the
    checkpoint, its step, the closed-loop seed and episodes it was chosen on), from its JSON
    part alone; None for any other checkpoint."""
    path = recover(path)
    try:
        info = json.loads((path / STATE).read_text()).get(SELECTED)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint '{path}': {STATE} is unreadable ({exc})") from None
    return info if isinstance(info, dict) else None


def load_folder(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint folder, verifying its checksum (checkpoints written before checksums
    were stored are read without) and refusing non-finite floating-point tensors."""
    path = recover(path)
    if not is_complete(path):
        raise CheckpointError(f"checkpoint '{path}' is incomplete: expected {STATE} and {TENSORS}")
    try:
        if (path / CHECKSUM).is_file():
            expected = json.loads((path / CHECKSUM).read_text())["sha256"]
            if file_sha256(path / TENSORS) != expected:
                raise CheckpointError(
                    f"checkpoint '{path}': {TENSORS} does not match the checksum stored when it "
                    "was written (the file was modified or damaged)"
                )
        structure = json.loads((path / STATE).read_text())
        tensors = load_file(str(path / TENSORS))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint '{path}' is corrupt ({str(exc)[:120]})") from None
    state = decode(structure, tensors)
    weights = state.get("state_dict") if isinstance(state, dict) else None
    for name, value in (weights or {}).items():
        floating = isinstance(value, torch.Tensor) and value.is_floating_point()
        if floating and not torch.isfinite(value).all():
            raise CheckpointError(
                f"checkpoint '{path}': tensor '{name}' holds NaN or infinite values; "
                "refusing to load it"
            )
    return state


def read_weights(path: str | Path, key: str = "train_setup.init_checkpoint") -> dict[str, Any]:
    """Tensors by name from a run folder (its best, else last, checkpoint), a ``.safetensors``
    file, or a PyTorch file read with ``weights_only=True``: a pickle that holds more than
    tensors and plain containers is refused, never unpickled."""
    import pickle

    path = Path(path)
    if path.is_dir():
        folder = path / "checkpoints" / "best"
        if not is_complete(recover(folder)):
            folder = path / "checkpoints" / "last"
        if not is_complete(recover(folder)):
            raise CheckpointError(f"{key} '{path}' is a folder without checkpoints/best or last")
        state = load_folder(folder).get("state_dict", {})
        return {k.removeprefix("policy."): v for k, v in state.items()}
    if not path.is_file():
        raise CheckpointError(f"{key} '{path}' does not exist")
    if path.suffix == ".safetensors":
        try:
            return dict(load_file(str(path)))
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"{key} '{path}' is not a readable safetensors file") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{key} '{path}' holds Python objects besides tensors, which are not unpickled "
            f"here ({str(exc).splitlines()[0][:160]}); save its state_dict alone "
            "(torch.save(model.state_dict(), F)) or as .safetensors"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        why = str(exc)[:160]
        raise CheckpointError(f"{key} '{path}' is not a PyTorch checkpoint ({why})") from None
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model_state_dict", "model"):  # Lightning, RoboVLMs
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    items = obj.items() if isinstance(obj, dict) else ()
    tensors = {k: v for k, v in items if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{key} '{path}' holds no tensors by name (expected a state_dict)")
    return tensors


def load_init_weights(policy: torch.nn.Module, path: str | Path) -> str:
    """Copy the tensors of ``path`` whose names and shapes match the policy's (after removing
    the wrappers' prefixes ``module.``, ``model.``, ``policy.``; LoRA's ``base_layer`` is
    matched to the plain layer it wraps). Returns a one-line account; refuses a file of which
    no tensor matches, or one with a non-finite tensor."""
    own = policy.state_dict()
    canonical = {k.replace(".base_layer.", "."): k for k in own}
    loaded: dict[str, torch.Tensor] = {}
    shape_mismatch, unmatched = [], []
    for name, tensor in read_weights(path).items():
        short = name.replace(".base_layer.", ".")  # a LoRA run's own file names them so too
        for _ in range(3):
            target = canonical.get(short)
            if target is not None or "." not in short:
                break
            head, rest = short.split(".", 1)
            if head not in ("module", "model", "policy", "_orig_mod"):
                break
            short = rest
        if target is None:
            unmatched.append(name)
        elif tuple(own[target].shape) != tuple(tensor.shape):
            shape_mismatch.append(f"{name} {tuple(tensor.shape)} vs {tuple(own[target].shape)}")
        else:
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise CheckpointError(f"init checkpoint '{path}': tensor '{name}' is not finite")
            loaded[target] = tensor.to(own[target].dtype)
    if not loaded:
        example = ", ".join((unmatched + shape_mismatch)[:3])
        raise CheckpointError(
            f"init checkpoint '{path}': none of its tensors matches this policy by name and "
            f"shape (e.g. {example}); it was saved from another architecture"
        )
    policy.load_state_dict(loaded, strict=False)
    return (
        f"initialised {len(loaded)} of the policy's {len(own)} tensors from '{path}'"
        + (f"; {len(shape_mismatch)} of its tensors have other shapes" if shape_mismatch else "")
        + (f"; {len(unmatched)} match no name here" if unmatched else "")
    )
