"""The prefix feature cache: what the frozen part of the backbone computes per frame, once.

With the built-in backbone frozen (strategy ``frozen``), everything up to the action tokens is
fixed: the ViT, the sentence encoder, the projectors, and — because image and text tokens never
attend to the action tokens — the keys and values every fusion layer computes from them. Those
are computed once per frame in eval mode with the exact training preprocessing and stored as
memory-mapped ``.npy`` files; training then runs only the action tokens through the fusion
layers (and the head) against the cached keys and values.

When fusion layers train (LoRA in every layer or in the top ``train_setup.lora_layers``,
``partial``'s last layers) everything below the first trainable layer ``k`` is still fixed:
the entry then holds the keys and values of layers ``0 .. k-1`` and the image and text tokens'
hidden states entering layer ``k``, and training runs layers ``k ..`` live on those states
plus the action tokens (``k = 0``: the vision tower, the sentence encoder and the projections
are what is cached).

An entry is keyed by the hash of the backbone's weights, the preprocessing (frame size, model
input size, prompt, text length), the episode file's content and its instruction, so any change
builds a new entry. A truncated or mis-shaped entry is reported in one log line and rebuilt.
The cache is used only when it is exact: nothing below the fusion layers trains (vision
tower, projections, sentence encoder), no gradual unfreezing, ``post`` history, no image
augmentation (augmented frames are never the same twice), and a backbone that has a prefix
path; otherwise training is live and the log says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import json
import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from mobile_vla.config import Config
from mobile_vla.data.dataset import EpisodeDataset
from mobile_vla.data.frame_cache import FrameCache
from mobile_vla.data.hdf5 import EpisodeInfo
from mobile_vla.errors import DataError
from mobile_vla.io import atomic_path

log = logging.getLogger(__name__)

DISK_MARGIN = 1 << 30  # left free beside the cache


def cache_split(cfg: Config, policy: Any) -> tuple[int | None, str]:
    """The fusion layer below which everything is fixed (the number of layers when the
    backbone is frozen), or None, with the reason: when the cache is exact and what it holds."""
    aug = cfg.data.augment
    backbone = policy.backbone
    if not cfg.data.feature_cache:
        return None, "data.feature_cache is off"
    if not hasattr(backbone, "prefix_split"):
        return None, f"backbone '{cfg.backbone.name}' has no cacheable prefix"
    if cfg.backbone.history != "post":
        return None, "history mode 'pre' encodes whole windows"
    if cfg.train_setup.strategy == "gradual":
        return None, "gradual unfreezing changes the backbone during training"
    if aug.color_jitter > 0 or aug.shift_pixels > 0 or aug.mirror_prob > 0:
        return None, "image augmentation is on (augmented frames are computed live)"
    split = backbone.trainable_split()
    if split is None:
        return None, (
            f"part of the backbone below its fusion layers trains (strategy "
            f"{cfg.train_setup.strategy})"
        )
    if split == len(backbone.fusion):
        return split, "backbone frozen"
    return split, f"fusion layers {split}.. train; everything below layer {split} is cached"


def cache_applies(cfg: Config, policy: Any) -> tuple[bool, str]:
    """Whether the prefix cache is exact for this run, and why (not)."""
    split, reason = cache_split(cfg, policy)
    return split is not None, reason


def _weights_hash(module: torch.nn.Module, split: int | None = None) -> str:
    """Hash of the weights the cache depends on: all, or those below fusion layer ``split``
    (the layers from ``split`` up and the final norm change in training)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if split is not None and _at_or_above(name, split):
            continue
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _at_or_above(name: str, split: int) -> bool:
    if name.startswith("fusion_norm."):
        return True
    parts = name.split(".")
    return parts[0] == "fusion" and parts[1].isdigit() and int(parts[1]) >= split


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``; nothing
    elsewhere). An entry's build allocates and frees tens of MB of tensors; glibc raises its
    mmap threshold after the first such free, serves the later ones from the heap, and keeps
    what fragmentation leaves there: building 1,880 entries of the built-in backbone grew the
    process by 15 GiB of freed memory, which then crowded the cache's own pages out of RAM
    (``python bench/bench_cache_memory.py``)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim


class PrefixCache:
    """Per-episode cached prefix: keys/values (T, k, 2, P, D) float32 of the fusion layers
    below ``split`` = k, a (P,) mask, and, when layers from k up train, the hidden states
    (T, P, D) entering layer k. ``split`` defaults to the number of layers (frozen)."""

    def __init__(
        self, cfg: Config, policy: Any, frames: FrameCache, split: int | None = None
    ) -> None:
        self.cfg, self.policy, self.frames = cfg, policy, frames
        backbone = policy.backbone
        layers = len(backbone.fusion)
        self.split = layers if split is None else split
        recipe = {
            "weights": _weights_hash(backbone, self.split if self.split < layers else None),
            "frame_size": list(cfg.data.image_size),
            "input_size": list(backbone.image_size),
            "prompt": cfg.backbone.prompt,
            "max_text_tokens": getattr(backbone, "max_text_tokens", None),
            "format": 1,
        }
        if self.split < layers:
            recipe["split"] = self.split
        self.model_key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
        self.root = cfg.data.resolved_cache_dir() / "prefix" / self.model_key[:20]
        self.rebuilt: list[str] = []
        self._maps: dict[Path, tuple[np.ndarray, np.ndarray]] = {}

    def _paths(self, ep: EpisodeInfo) -> tuple[Path, Path]:
        content = self.frames.episode_key(ep)
        key = hashlib.sha256(f"{content}|{ep.instruction}".encode()).hexdigest()[:32]
        return self.root / f"{key}.npy", self.root / f"{key}_mask.npy"

    def _hidden_path(self, ep: EpisodeInfo) -> Path | None:
        if self.split == len(self.policy.backbone.fusion):
            return None
        kv_path, _ = self._paths(ep)
        return kv_path.with_name(kv_path.stem + "_hidden.npy")

    def _expected(self, ep: EpisodeInfo) -> tuple[int, ...]:
        bb = self.policy.backbone
        tokens = bb.vision.num_patches + bb.max_text_tokens
        return (ep.num_frames, self.split, 2, tokens, bb.hidden_size)

    def _hidden_shape(self, ep: EpisodeInfo) -> tuple[int, int, int]:
        """Hidden states after the cached layers: (frames, tokens, hidden size)."""
        t, _, _, tokens, d = self._expected(ep)
        return (t, tokens, d)

    def _files(self, ep: EpisodeInfo) -> list[Path]:
        """Every file of an episode's entry: keys/values, mask and, when fusion layers train,
        hidden states."""
        hidden_path = self._hidden_path(ep)
        return [*self._paths(ep), *([hidden_path] if hidden_path else [])]

    def _open(self, ep: EpisodeInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        paths = self._files(ep)
        kv_path, mask_path, *hidden_file = paths
        hidden_path = hidden_file[0] if hidden_file else None
        if not all(p.exists() for p in paths):
            return None
        try:
            kv = np.load(kv_path, mmap_mode="r", allow_pickle=False)
            mask = np.load(mask_path, allow_pickle=False)
            hidden = np.load(hidden_path, mmap_mode="r") if hidden_path else None
            expected = self._expected(ep)
            want_hidden = self._hidden_shape(ep)
            if kv.shape != expected or kv.dtype != np.float32 or mask.shape != (expected[3],):
                problem = f"holds {kv.dtype} {kv.shape}, expected float32 {expected}"
            elif hidden is not None and (hidden.shape != want_hidden or hidden.dtype != np.float32):
                problem = f"has hidden states {hidden.dtype} {hidden.shape}, expected {want_hidden}"
            else:
                return kv, mask, hidden
        except (ValueError, OSError, EOFError) as exc:
            problem = f"is unreadable ({str(exc).splitlines()[0][:100]})"
        msg = f"feature cache entry {kv_path.name} {problem}; rebuilding it"
        log.warning(msg)
        self.rebuilt.append(msg)
        for path in paths:
            path.unlink(missing_ok=True)
        return None

    @torch.no_grad()
    def _build(self, ep: EpisodeInfo, batch: int = 32) -> None:
        try:
            self._write(ep, batch)
        finally:
            release_freed_memory()

    def _write(self, ep: EpisodeInfo, batch: int) -> None:
        bb = self.policy.backbone
        was_training = bb.training
        bb.eval()
        kv_path, mask_path = self._paths(ep)
        hidden_path = self._hidden_path(ep)
        frames = self.frames.frames(ep)
        device = self.policy.action_token.device
        expected = self._expected(ep)
        try:
            with contextlib.ExitStack() as stack:
                tmp = stack.enter_context(atomic_path(kv_path, suffix=".npy"))
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=expected)
                hidden = None
                if hidden_path is not None:
                    tmp_h = stack.enter_context(atomic_path(hidden_path, suffix=".npy"))
                    hidden = np.lib.format.open_memmap(
                        tmp_h, mode="w+", dtype=np.float32, shape=self._hidden_shape(ep)
                    )
                mask = None
                for s in range(0, ep.num_frames, batch):
                    chunk = torch.from_numpy(
                        np.ascontiguousarray(frames[s : s + batch].transpose(0, 3, 1, 2))
                    ).to(device)
                    kv, x, m = bb.prefix_split(
                        bb.preprocess(chunk), [ep.instruction] * len(chunk), self.split
                    )
                    out[s : s + len(chunk)] = kv.float().cpu().numpy()
                    if hidden is not None:
                        hidden[s : s + len(chunk)] = x.float().cpu().numpy()
                    mask = m[0].cpu().numpy()
                out.flush()
                del out
                if hidden is not None:
                    hidden.flush()
                    del hidden
            with atomic_path(mask_path, suffix=".npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, mask)
        finally:
            bb.train(was_training)

    def entry(self, ep: EpisodeInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(keys/values, mask, hidden states or None) of an episode, built when missing."""
        entry = self._maps.get(ep.path)
        if entry is None:
            entry = self._open(ep)
            if entry is None:
                self._build(ep)
                entry = self._open(ep)
                assert entry is not None, "feature cache entry could not be written"
            self._maps[ep.path] = entry
        return entry

    def get(self, ep: EpisodeInfo) -> tuple[np.ndarray, np.ndarray]:
        """(keys/values, mask) of an episode."""
        return self.entry(ep)[:2]

    def entry_bytes(self, ep: EpisodeInfo) -> int:
        """What an episode's entry takes on disk (float32 keys/values, hidden states)."""
        hidden = 0 if self._hidden_path(ep) is None else math.prod(self._hidden_shape(ep))
        return 4 * (math.prod(self._expected(ep)) + hidden) + 4096

    def ensure(self, episodes: Sequence[EpisodeInfo], progress: bool = False) -> None:
        """Build every missing entry, after checking that they fit on the cache's disk: a
        memory-mapped write that runs out of space kills the process (SIGBUS) instead of
        raising, so the check comes first."""
        missing = [ep for ep in episodes if not all(p.exists() for p in self._files(ep))]
        need = sum(self.entry_bytes(ep) for ep in missing)
        if missing:
            self.root.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.root).free
            if need > free - DISK_MARGIN:
                raise DataError(
                    f"the feature cache in '{self.root}' needs {need / 2**30:.1f} GiB for "
                    f"{len(missing)} episodes and the disk has {free / 2**30:.1f} GiB free "
                    f"(keeping {DISK_MARGIN / 2**30:.0f} GiB spare): free space, point "
                    "data.cache_dir at a larger disk, or set data.feature_cache=false"
                )
        for ep in tqdm(episodes, desc="feature cache", unit="ep", disable=not progress):
            self.get(ep)

    def __getstate__(self) -> dict[str, Any]:  # workers re-open their own maps
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state


class CachedPrefixDataset(Dataset):
    """An :class:`EpisodeDataset` whose samples name the cached prefix of each window frame
    (``prefix_ref`` (W, 2): episode, frame) instead of carrying images; :meth:`collate`
    reads each distinct frame of a batch once, straight into the batch tensor."""

    def __init__(self, base: EpisodeDataset, cache: PrefixCache) -> None:
        self.base, self.cache = base, cache

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.base.sample(i, images=False)
        frame_idx, _ = self.base.window(i)
        ref = np.stack([np.full(len(frame_idx), sample["episode"]), frame_idx], axis=1)
        sample["prefix_ref"] = torch.from_numpy(ref.astype(np.int64))
        return sample

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """The default collate, plus ``prefix_kv`` (U, k, 2, P', D), ``prefix_mask`` (U, P')
        and, when fusion layers train, ``prefix_hidden`` (U, P', D) for the U distinct frames
        of the batch, and ``prefix_index`` (B, W) into them.
        P' <= P drops the trailing prefix positions that are padding in every frame of the
        batch (the text is padded to ``max_text_tokens``): they are masked out of attention,
        so the result is the same, with less to read."""
        from mobile_vla.training.common import collate

        batch = collate(samples)
        refs = batch.pop("prefix_ref")  # (B, W, 2)
        unique, inverse = torch.unique(refs.view(-1, 2), dim=0, return_inverse=True)
        u = unique.numpy()
        episodes = np.unique(u[:, 0])
        entries = {int(e): self.cache.entry(self.base.episodes[int(e)]) for e in episodes}
        used = max(int(np.flatnonzero(m)[-1]) + 1 for _, m, _ in entries.values())
        kv0, _, hidden0 = next(iter(entries.values()))
        # numpy's allocator asks the kernel for huge pages for large buffers: a batch's tens
        # of MB of keys/values are written in a quarter of the time a torch.empty buffer takes
        # to fault in page by page.
        out = np.empty((len(u), *kv0.shape[1:3], used, kv0.shape[4]), dtype=np.float32)
        out_mask = np.empty((len(u), used), dtype=bool)
        out_hidden = None
        if hidden0 is not None:
            out_hidden = np.empty((len(u), used, hidden0.shape[2]), dtype=np.float32)
        for e in episodes:
            rows = np.nonzero(u[:, 0] == e)[0]
            ep_kv, ep_mask, ep_hidden = entries[int(e)]
            for r, f in zip(rows, u[rows, 1], strict=True):
                out[r] = ep_kv[f, :, :, :used]
                if out_hidden is not None:
                    out_hidden[r] = ep_hidden[f, :used]
            out_mask[rows] = ep_mask[:used]
        batch["prefix_kv"] = torch.from_numpy(out)
        batch["prefix_mask"] = torch.from_numpy(out_mask)
        batch["prefix_index"] = inverse.view(refs.shape[:2])
        if out_hidden is not None:
            batch["prefix_hidden"] = torch.from_numpy(out_hidden)
        return batch
