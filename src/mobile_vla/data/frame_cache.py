"""Frames decoded and resized once, into memory-mappable ``.npy`` files.

An entry is keyed by the SHA-256 of the source file's bytes and the target size::

    <root>/frames/<sha[:2]>/<sha>_<H>x<W>.npy      uint8 (T, H, W, 3)

so an episode that changes on disk gets a new entry, and the same content is shared between
folders. Hashing reads the file once; the digest is remembered in ``<root>/index.json`` under the
file's (size, mtime, inode), as git does, and recomputed whenever those change. An entry that is
truncated or has the wrong shape is reported in one log line and rebuilt, never used.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mobile_vla.data.hdf5 import EpisodeInfo, FrameReader, verify_frames
from mobile_vla.data.images import resize_frames
from mobile_vla.errors import EpisodeError
from mobile_vla.io import atomic_path, atomic_write_json, file_sha256

log = logging.getLogger(__name__)


def stored_channel_order(episode: EpisodeInfo, configured: str = "auto") -> str:
    """How the file stores its frames: ``configured`` unless it is ``auto``, then the file's
    ``channel_order`` attribute (``collect`` writes ``rgb``), else ``rgb``. The robot's OpenCV
    collector stores BGR without saying so: set ``data.channel_order: bgr`` for its files."""
    if configured != "auto":
        return configured
    attr = str(episode.attrs.get("channel_order", "rgb")).lower()
    return attr if attr in ("rgb", "bgr") else "rgb"


def to_rgb(frames: np.ndarray, order: str) -> np.ndarray:
    return np.ascontiguousarray(frames[..., ::-1]) if order == "bgr" else frames


def model_frames(
    reader: FrameReader,
    episode: EpisodeInfo,
    indices: Sequence[int],
    size: Sequence[int],
    channel_order: str = "auto",
) -> np.ndarray:
    """Frames ``indices`` of an episode as the model sees them: RGB (per
    :func:`stored_channel_order`) and resized to ``size``; uint8 (len(indices), H, W, 3)."""
    order = stored_channel_order(episode, channel_order)
    return resize_frames(to_rgb(reader.frames(indices), order), size)


def _collect_errors(
    episodes: Sequence[EpisodeInfo], check: Any, desc: str, progress: bool
) -> list[EpisodeError]:
    bad = []
    for ep in tqdm(episodes, desc=desc, unit="ep", disable=not progress):
        try:
            check(ep)
        except EpisodeError as exc:
            bad.append(exc)
    return bad


class FrameCache:
    """Per-episode memory-mapped frames at one target size, always RGB (files stored as BGR
    are converted on the way in, per :func:`stored_channel_order`)."""

    def __init__(self, root: str | Path, size: Sequence[int], channel_order: str = "auto") -> None:
        self.root = Path(root)
        self.size = (int(size[0]), int(size[1]))
        self.channel_order = channel_order
        self._index_path = self.root / "index.json"
        self._index: dict[str, dict] | None = None
        self._maps: dict[Path, np.ndarray] = {}
        self._lock = threading.Lock()
        self.rebuilt: list[str] = []  # entries found corrupt and rebuilt, for reporting

    # ---- content keys -----------------------------------------------------------------
    def _load_index(self) -> dict[str, dict]:
        if self._index is None:
            try:
                self._index = json.loads(self._index_path.read_text())
                if not isinstance(self._index, dict):
                    raise ValueError("index is not a mapping")
            except FileNotFoundError:
                self._index = {}
            except (ValueError, UnicodeDecodeError):
                log.warning("frame cache index %s is corrupt; rebuilding it", self._index_path)
                self._index = {}
        return self._index

    def content_key(self, path: str | Path) -> str:
        path = Path(path).resolve()
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        index = self._load_index()
        entry = index.get(str(path))
        if (
            isinstance(entry, dict)
            and entry.get("stat") == stamp
            and isinstance(entry.get("sha256"), str)
        ):
            return entry["sha256"]
        sha = file_sha256(path)
        index[str(path)] = {"stat": stamp, "sha256": sha}
        return sha

    def episode_key(self, episode: EpisodeInfo) -> str:
        """The content key of what the model sees of an episode: the file's bytes and, for a
        file converted from BGR, that conversion (an RGB entry keeps the plain file hash)."""
        sha = self.content_key(episode.path)
        return sha + "-bgr" if stored_channel_order(episode, self.channel_order) == "bgr" else sha

    def save_index(self) -> None:
        if self._index is not None:
            atomic_write_json(self._index_path, self._index)

    def entry_path(self, sha: str) -> Path:
        h, w = self.size
        return self.root / "frames" / sha[:2] / f"{sha}_{h}x{w}.npy"

    # ---- entries --------------------------------------------------------------------------
    def _open_entry(self, entry: Path, num_frames: int) -> np.ndarray | None:
        """The mapped entry, or None when it is missing; a bad entry is logged and removed."""
        if not entry.exists():
            return None
        expected = (num_frames, *self.size, 3)
        try:
            arr = np.load(entry, mmap_mode="r", allow_pickle=False)
            problem = None
            if arr.dtype != np.uint8 or arr.shape != expected:
                problem = f"holds {arr.dtype} {arr.shape}, expected uint8 {expected}"
        except (ValueError, OSError, EOFError) as exc:
            problem = f"is unreadable ({str(exc).splitlines()[0][:100]})"
        if problem is None:
            return arr
        msg = f"frame cache entry {entry.name} {problem}; rebuilding it"
        log.warning(msg)
        self.rebuilt.append(msg)
        entry.unlink(missing_ok=True)
        return None

    def _build_entry(self, episode: EpisodeInfo, entry: Path) -> None:
        shape = (episode.num_frames, *self.size, 3)
        with FrameReader(episode.path) as reader, atomic_path(entry, suffix=".npy") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            for t in range(episode.num_frames):
                out[t] = model_frames(reader, episode, [t], self.size, self.channel_order)[0]
            out.flush()
            del out  # unmap before the rename

    def frames(self, episode: EpisodeInfo) -> np.ndarray:
        """uint8 (T, H, W, 3) memory map of the episode's resized frames (built on first use)."""
        with self._lock:
            cached = self._maps.get(episode.path)
            if cached is not None:
                return cached
            entry = self.entry_path(self.episode_key(episode))
            arr = self._open_entry(entry, episode.num_frames)
            if arr is None:
                self._build_entry(episode, entry)
                arr = self._open_entry(entry, episode.num_frames)
                if arr is None:  # pragma: no cover - disk full or similar
                    raise OSError(f"frame cache entry {entry} could not be written")
            self._maps[episode.path] = arr
            return arr

    def ensure(self, episodes: Sequence[EpisodeInfo], progress: bool = False) -> list[EpisodeError]:
        """Build every missing entry up front (with a progress bar) and save the hash index;
        returns the errors of episodes whose frames cannot be decoded (no entry is left)."""
        bad = _collect_errors(episodes, self.frames, "frame cache", progress)
        self.save_index()
        return bad

    def __getstate__(self) -> dict:
        # Worker processes re-open their own maps.
        state = self.__dict__.copy()
        state["_maps"] = {}
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class DirectFrames:
    """Frames read straight from the HDF5 files and resized on every access (no cache)."""

    def __init__(
        self, size: Sequence[int], max_open: int = 32, channel_order: str = "auto"
    ) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.max_open = max_open
        self.channel_order = channel_order
        self._readers: dict[Path, FrameReader] = {}

    def window(self, episode: EpisodeInfo, indices: Sequence[int]) -> np.ndarray:
        reader = self._readers.get(episode.path)
        if reader is None:
            if len(self._readers) >= self.max_open:
                _, old = self._readers.popitem()
                old.close()
            reader = self._readers[episode.path] = FrameReader(episode.path)
        unique = sorted(set(int(i) for i in indices))
        frames = model_frames(reader, episode, unique, self.size, self.channel_order)
        decoded = dict(zip(unique, frames, strict=True))
        return np.stack([decoded[int(i)] for i in indices])

    def ensure(self, episodes: Sequence[EpisodeInfo], progress: bool = False) -> list[EpisodeError]:
        """Decode every frame of every episode once (nothing is kept); returns the errors of
        episodes whose frames cannot be decoded."""
        check = lambda ep: verify_frames(ep.path)  # noqa: E731
        return _collect_errors(episodes, check, "checking frames", progress)

    def __getstate__(self) -> dict:
        return {
            "size": self.size,
            "max_open": self.max_open,
            "channel_order": self.channel_order,
            "_readers": {},
        }
