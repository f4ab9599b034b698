"""The frozen-prefix feature cache: what a frozen backbone computes per frame, computed once.

With the built-in backbone frozen (strategy ``frozen``), everything up to the action tokens is
fixed: the ViT, the sentence encoder, the projectors, and — because image and text tokens never
attend to the action tokens — the keys and values every fusion layer computes from them. Those
are computed once per frame in eval mode with the exact training preprocessing and stored as
memory-mapped ``.npy`` files; training then runs only the action tokens through the fusion
layers (and the head) against the cached keys and values.

An entry is keyed by the hash of the backbone's weights, the preprocessing (frame size, model
input size, prompt, text length), the episode file's content and its instruction, so any change
builds a new entry. A truncated or mis-shaped entry is reported in one log line and rebuilt.
The cache is used only when it is exact: the backbone entirely frozen (no LoRA, no gradual
unfreezing), ``post`` history, no image augmentation (augmented frames are never the same
twice), and a backbone that has a prefix path; otherwise training is live and the log says why.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
from mobile_vla.io import atomic_path

log = logging.getLogger(__name__)


def cache_applies(cfg: Config, policy: Any) -> tuple[bool, str]:
    """Whether the prefix cache is exact for this run, and why not when it is not."""
    aug = cfg.data.augment
    if not cfg.data.feature_cache:
        return False, "data.feature_cache is off"
    if not hasattr(policy.backbone, "prefix"):
        return False, f"backbone '{cfg.backbone.name}' has no cacheable prefix"
    if cfg.backbone.history != "post":
        return False, "history mode 'pre' encodes whole windows"
    if cfg.train_setup.strategy == "gradual":
        return False, "gradual unfreezing changes the backbone during training"
    if any(p.requires_grad for p in policy.backbone.parameters()):
        return False, f"part of the backbone trains (strategy {cfg.train_setup.strategy})"
    if aug.color_jitter > 0 or aug.shift_pixels > 0 or aug.mirror_prob > 0:
        return False, "image augmentation is on (augmented frames are computed live)"
    return True, "backbone frozen"


def _weights_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class PrefixCache:
    """Per-episode cached prefix keys/values: (T, L, 2, P, D) float32 and a (P,) mask."""

    def __init__(self, cfg: Config, policy: Any, frames: FrameCache) -> None:
        self.cfg, self.policy, self.frames = cfg, policy, frames
        backbone = policy.backbone
        recipe = {
            "weights": _weights_hash(backbone),
            "frame_size": list(cfg.data.image_size),
            "input_size": list(backbone.image_size),
            "prompt": cfg.backbone.prompt,
            "max_text_tokens": getattr(backbone, "max_text_tokens", None),
            "format": 1,
        }
        self.model_key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
        self.root = cfg.data.resolved_cache_dir() / "prefix" / self.model_key[:20]
        self.rebuilt: list[str] = []
        self._maps: dict[Path, tuple[np.ndarray, np.ndarray]] = {}

    def _paths(self, ep: EpisodeInfo) -> tuple[Path, Path]:
        content = self.frames.episode_key(ep)
        key = hashlib.sha256(f"{content}|{ep.instruction}".encode()).hexdigest()[:32]
        return self.root / f"{key}.npy", self.root / f"{key}_mask.npy"

    def _expected(self, ep: EpisodeInfo) -> tuple[int, ...]:
        bb = self.policy.backbone
        tokens = bb.vision.num_patches + bb.max_text_tokens
        return (ep.num_frames, len(bb.fusion), 2, tokens, bb.hidden_size)

    def _open(self, ep: EpisodeInfo) -> tuple[np.ndarray, np.ndarray] | None:
        kv_path, mask_path = self._paths(ep)
        if not kv_path.exists() or not mask_path.exists():
            return None
        try:
            kv = np.load(kv_path, mmap_mode="r", allow_pickle=False)
            mask = np.load(mask_path, allow_pickle=False)
            expected = self._expected(ep)
            if kv.shape != expected or kv.dtype != np.float32 or mask.shape != (expected[3],):
                problem = f"holds {kv.dtype} {kv.shape}, expected float32 {expected}"
            else:
                return kv, mask
        except (ValueError, OSError, EOFError) as exc:
            problem = f"is unreadable ({str(exc).splitlines()[0][:100]})"
        msg = f"feature cache entry {kv_path.name} {problem}; rebuilding it"
        log.warning(msg)
        self.rebuilt.append(msg)
        kv_path.unlink(missing_ok=True)
        mask_path.unlink(missing_ok=True)
        return None

    @torch.no_grad()
    def _build(self, ep: EpisodeInfo, batch: int = 32) -> None:
        bb = self.policy.backbone
        was_training = bb.training
        bb.eval()
        kv_path, mask_path = self._paths(ep)
        frames = self.frames.frames(ep)
        device = self.policy.action_token.device
        try:
            with atomic_path(kv_path, suffix=".npy") as tmp:
                out = np.lib.format.open_memmap(
                    tmp, mode="w+", dtype=np.float32, shape=self._expected(ep)
                )
                mask = None
                for s in range(0, ep.num_frames, batch):
                    chunk = torch.from_numpy(
                        np.ascontiguousarray(frames[s : s + batch].transpose(0, 3, 1, 2))
                    ).to(device)
                    kv, m = bb.prefix(bb.preprocess(chunk), [ep.instruction] * len(chunk))
                    out[s : s + len(chunk)] = kv.float().cpu().numpy()
                    mask = m[0].cpu().numpy()
                out.flush()
                del out
            with atomic_path(mask_path, suffix=".npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, mask)
        finally:
            bb.train(was_training)

    def get(self, ep: EpisodeInfo) -> tuple[np.ndarray, np.ndarray]:
        entry = self._maps.get(ep.path)
        if entry is None:
            entry = self._open(ep)
            if entry is None:
                self._build(ep)
                entry = self._open(ep)
                assert entry is not None, "feature cache entry could not be written"
            self._maps[ep.path] = entry
        return entry

    def ensure(self, episodes: Sequence[EpisodeInfo], progress: bool = False) -> None:
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
        from mobile_vla.data.dataset import window_indices

        sample = self.base.sample(i, images=False)
        frame_idx, _ = window_indices(sample["frame"], self.base.cfg.window_size)
        ref = np.stack([np.full(len(frame_idx), sample["episode"]), frame_idx], axis=1)
        sample["prefix_ref"] = torch.from_numpy(ref.astype(np.int64))
        return sample

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """The default collate, plus ``prefix_kv`` (U, L, 2, P', D) and ``prefix_mask``
        (U, P') for the U distinct frames of the batch and ``prefix_index`` (B, W) into them.
        P' <= P drops the trailing prefix positions that are padding in every frame of the
        batch (the text is padded to ``max_text_tokens``): they are masked out of attention,
        so the result is the same, with less to read."""
        from mobile_vla.training.module import collate

        batch = collate(samples)
        refs = batch.pop("prefix_ref")  # (B, W, 2)
        unique, inverse = torch.unique(refs.view(-1, 2), dim=0, return_inverse=True)
        u = unique.numpy()
        episodes = np.unique(u[:, 0])
        entries = {int(e): self.cache.get(self.base.episodes[int(e)]) for e in episodes}
        used = max(int(np.flatnonzero(m)[-1]) + 1 for _, m in entries.values())
        kv0 = next(iter(entries.values()))[0]
        # numpy's allocator asks the kernel for huge pages for large buffers: a batch's tens
        # of MB of keys/values are written in a quarter of the time a torch.empty buffer takes
        # to fault in page by page.
        out = np.empty((len(u), *kv0.shape[1:3], used, kv0.shape[4]), dtype=np.float32)
        out_mask = np.empty((len(u), used), dtype=bool)
        for e in episodes:
            rows = np.nonzero(u[:, 0] == e)[0]
            ep_kv, ep_mask = entries[int(e)]
            for r, f in zip(rows, u[rows, 1], strict=True):
                out[r] = ep_kv[f, :, :, :used]
            out_mask[rows] = ep_mask[:used]
        batch["prefix_kv"] = torch.from_numpy(out)
        batch["prefix_mask"] = torch.from_numpy(out_mask)
        batch["prefix_index"] = inverse.view(refs.shape[:2])
        return batch
