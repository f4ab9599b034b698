"""Training samples: a window of frames and the action chunk that follows.

For every frame ``t`` of an episode (the "current" frame) one sample holds

* ``images``      uint8 (window_size, 3, H, W): frames t-window_size+1 .. t; frames before the
  episode start repeat frame 0 and are marked False in ``obs_mask``;
* ``actions``     float32 (fwd_pred_next_n, D): normalized actions a_{t+o} .. a_{t+o+n-1}
  (o = ``chunk_offset``) of the ``action_dims`` columns; steps past the episode end are zero
  and marked False in ``action_mask``;
* ``actions_raw`` the same chunk in physical units (what metrics compare against);
* ``instruction`` str, ``side`` (+1 left, -1 right, 0 unknown, after any mirroring), and the
  episode/frame indices.

So an episode shorter than window + chunk still gives one sample per frame, padded and masked,
never dropped. Randomness (augmentation) comes from a generator seeded by (seed, epoch, index),
so a sample depends only on its index and epoch; nothing reseeds a global RNG.

With ``per_step`` (``head.per_step``: the training and validation sets) a sample is instead
the window of frames s .. s+window_size-1 for s = 0, W, 2W, ... (padding, if any, after the
episode's end) with the chunk after *each* of its frames: ``actions`` (W, N, D),
``action_mask`` (W, N) (False at padding frames); ``frame`` is s.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mobile_vla.config import Config, DataConfig
from mobile_vla.data.augmentation import augment
from mobile_vla.data.episodes import (
    Split,
    derived_of,
    load_episodes,
    split_episodes,
    train_subset,
)
from mobile_vla.data.frame_cache import DirectFrames, FrameCache
from mobile_vla.data.hdf5 import EpisodeInfo
from mobile_vla.data.normalization import ActionStats, Normalizer
from mobile_vla.errors import DataError

SIDE_VALUE = {"left": 1, "right": -1}

log = logging.getLogger(__name__)


def side_of_instruction(text: str) -> int:
    """+1 if the instruction says left, -1 if right, 0 if neither or both."""
    words = set(text.lower().replace(",", " ").replace(".", " ").split())
    left, right = "left" in words, "right" in words
    return 1 if left and not right else -1 if right and not left else 0


def window_indices(t: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame indices of the window ending at ``t`` (clamped at 0) and the mask of real frames."""
    raw = np.arange(t - window + 1, t + 1)
    return np.maximum(raw, 0), raw >= 0


def chunk_indices(t: int, n: int, offset: int, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Action indices of the chunk after ``t`` and the mask of steps inside the episode."""
    raw = np.arange(t + offset, t + offset + n)
    valid = raw < num_frames
    return np.where(valid, raw, 0), valid


class EpisodeDataset(Dataset):
    """Window + chunk samples over a list of episodes (see module docstring)."""

    def __init__(
        self,
        episodes: Sequence[EpisodeInfo],
        cfg: DataConfig,
        normalizer: Normalizer,
        train: bool = False,
        seed: int = 0,
        frame_source: FrameCache | DirectFrames | None = None,
        per_step: bool = False,
    ) -> None:
        self.episodes = list(episodes)
        self.per_step = per_step
        self.cfg = cfg
        self.normalizer = normalizer
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.action_idx = cfg.action_indices
        self.frames = frame_source if frame_source is not None else make_frame_source(cfg)
        index = []
        for e, ep in enumerate(self.episodes):
            # A frame yields a sample when its chunk has at least one action inside the episode.
            last = ep.num_frames - cfg.chunk_offset
            stride = cfg.window_size if per_step else 1
            index.extend((e, t) for t in range(0, max(last, 0), stride))
        self.index = np.asarray(index, dtype=np.int64).reshape(-1, 2)
        # first global frame number of each episode: ``frame_id`` names a frame across episodes
        self.frame_offset = np.cumsum([0] + [ep.num_frames for ep in self.episodes])
        aug = cfg.augment
        self.augmenting = train and (
            aug.color_jitter > 0 or aug.shift_pixels > 0 or aug.mirror_prob > 0
        )

    def set_epoch(self, epoch: int) -> None:
        """Changes the augmentation draws; call once per epoch (workers see it after a re-fork)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.index)

    def _window_frames(self, ep: EpisodeInfo, frame_idx: np.ndarray) -> np.ndarray:
        if isinstance(self.frames, FrameCache):
            return np.asarray(self.frames.frames(ep)[frame_idx])
        return self.frames.window(ep, frame_idx)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.sample(i)

    def window(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame indices of sample ``i``'s window and the mask of its real frames."""
        e, t = (int(v) for v in self.index[i])
        if not self.per_step:
            return window_indices(t, self.cfg.window_size)
        raw = np.arange(t, t + self.cfg.window_size)
        real = raw < self.episodes[e].num_frames
        return np.where(real, raw, t), real

    def _chunks(self, ep: EpisodeInfo, t: int, obs_mask: np.ndarray) -> tuple[np.ndarray, ...]:
        """Action indices and masks of the chunk after frame t, or (``per_step``) after each
        frame of the window starting at t: (N,) or (W, N)."""
        n, offset = self.cfg.fwd_pred_next_n, self.cfg.chunk_offset
        if not self.per_step:
            return chunk_indices(t, n, offset, ep.num_frames)
        pairs = [chunk_indices(t + j, n, offset, ep.num_frames) for j in range(len(obs_mask))]
        idx = np.stack([p[0] for p in pairs])
        return idx, np.stack([p[1] for p in pairs]) & obs_mask[:, None]

    def sample(self, i: int, images: bool = True) -> dict[str, Any]:
        """Sample ``i``; ``images=False`` leaves the frames out (a cached prefix replaces them;
        only valid without image augmentation)."""
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        e, t = (int(v) for v in self.index[i])
        ep = self.episodes[e]
        cfg = self.cfg
        frame_idx, obs_mask = self.window(i)
        act_idx, act_mask = self._chunks(ep, t, obs_mask)
        frames = (
            self._window_frames(ep, frame_idx)
            if images
            else np.zeros((len(frame_idx), 1, 1, 3), np.uint8)
        )
        actions = ep.actions[act_idx][..., self.action_idx]
        instruction = ep.instruction
        mirrored = False
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, int(i)])
            action_names = [cfg.action_names[k] for k in self.action_idx]
            aug = augment(frames, actions, instruction, action_names, cfg.augment, rng)
            frames, actions, instruction, mirrored = (
                aug.frames,
                aug.actions,
                aug.instruction,
                aug.mirrored,
            )
        norm = self.normalizer.normalize(actions)
        norm[~act_mask] = 0.0
        raw = np.asarray(actions, dtype=np.float32).copy()
        raw[~act_mask] = 0.0
        out = {
            "images": torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2))),
            "obs_mask": torch.from_numpy(obs_mask),
            "actions": torch.from_numpy(norm),
            "action_mask": torch.from_numpy(act_mask),
            "actions_raw": torch.from_numpy(raw),
            "instruction": instruction,
            "side": side_of_instruction(instruction),
            "mirrored": mirrored,
            "episode": e,
            "frame": t,
        }
        if not self.augmenting:  # equal ids = equal pixels: the policy encodes each id once
            out["frame_id"] = torch.from_numpy(frame_idx + self.frame_offset[e])
        if not images:
            del out["images"]
        return out


def make_frame_source(cfg: DataConfig) -> FrameCache | DirectFrames:
    if cfg.frame_cache:
        return FrameCache(cfg.resolved_cache_dir(), cfg.image_size, cfg.channel_order)
    return DirectFrames(cfg.image_size, channel_order=cfg.channel_order)


@dataclass
class DataBundle:
    """Everything training needs from the data layer."""

    split: Split
    stats: ActionStats
    normalizer: Normalizer
    train: EpisodeDataset
    val: EpisodeDataset


def drop_undecodable(
    episodes: list[EpisodeInfo],
    cfg: DataConfig,
    source: FrameCache | DirectFrames,
    progress: bool = False,
) -> list[EpisodeInfo]:
    """Decode every frame once before training (building the frame cache, or checking each
    frame without it), so a file with a frame that cannot be decoded is a bad file like any
    other: refused with its name and frame unless ``data.skip_bad``, then reported and left out
    — never found halfway through training."""
    bad = source.ensure(episodes, progress=progress)
    failed = {e.path for e in bad}
    good = [ep for ep in episodes if ep.path not in failed]
    if bad:
        listing = "; ".join(str(e) for e in bad)
        if not cfg.skip_bad:
            raise DataError(
                f"{len(bad)} episode file(s) in '{cfg.path}' have frames that cannot be decoded "
                f"(fix them or pass --data.skip_bad=true): {listing}"
            )
        log.warning("skipping %d episode file(s) in %s: %s", len(bad), cfg.path, listing)
    if not good:
        raise DataError(f"no usable episodes in '{cfg.path}' ({len(bad)} undecodable)")
    return good


def build_datasets(cfg: Config, progress: bool = False) -> DataBundle:
    """Load and validate the episodes, split them, fit normalization on the training split,
    build (or reuse) the frame cache, and return the two datasets."""
    data = cfg.data
    source = make_frame_source(data)
    episodes = load_episodes(data, progress=progress)
    if not data.counterfactual:
        episodes = [ep for ep in episodes if ep.source is None]
    episodes = drop_undecodable(episodes, data, source, progress)
    split_seed = cfg.seed if data.split_seed < 0 else data.split_seed
    split = split_episodes(episodes, data.val_fraction, split_seed, data.test_fraction)
    if data.train_episodes:
        recorded = len(derived_of(split.train)[0])
        if data.train_episodes > recorded:
            raise DataError(
                f"config key 'data.train_episodes' asks for {data.train_episodes} training "
                f"episodes; '{data.path}' has {recorded} recorded ones after the validation "
                "split"
            )
        split = Split(
            train_subset(split.train, data.train_episodes, split_seed), split.val, split.test
        )
    names = [data.action_names[k] for k in data.action_indices]
    stats = ActionStats.from_arrays(
        names, [ep.actions[:, data.action_indices] for ep in split.train]
    )
    normalizer = Normalizer(stats, data.normalization, (data.norm_min, data.norm_max))
    return DataBundle(
        split=split,
        stats=stats,
        normalizer=normalizer,
        train=EpisodeDataset(
            split.train, data, normalizer, True, cfg.seed, source, per_step=cfg.head.per_step
        ),
        val=EpisodeDataset(
            split.val, data, normalizer, False, cfg.seed, source, per_step=cfg.head.per_step
        ),
    )
