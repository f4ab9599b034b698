"""Reading the robot's HDF5 frames: h5py's automatic chunking against one chunk per frame.

    python bench/bench_hdf5_chunks.py [--episodes 4] [--frames 18]

The robot's collector may let h5py choose the chunk shape of a gzip-compressed ``images``
dataset (T, 720, 1280, 3): h5py picks chunks that span several frames and one colour channel
(here (3, 90, 160, 1): 1,152 chunks for 18 frames instead of 18). This writes the same
camera-like pixels in both layouts and measures, side by side in one process:

* decoding: frames/s of a whole episode in one slice (``images[:]``), and frame by frame, one
  call per frame, through ``FrameReader`` (what the frame cache does) and as it read before
  (the dataset opened anew per call, so its chunk cache, 1 MiB, started empty each time:
  each chunk was decompressed once per frame it holds);
* training samples/s (8-frame windows at 224x224) read directly from the files
  (``data.frame_cache: false``) and through the frame cache (the default), with the cache's
  one-time build per episode.

Prints the ratio automatic / per-frame chunking for each.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from common import ROOT, machine

sys.path.insert(0, str(ROOT / "src"))

from mobile_vla.config import DataConfig
from mobile_vla.data.dataset import EpisodeDataset
from mobile_vla.data.frame_cache import DirectFrames, FrameCache
from mobile_vla.data.hdf5 import FrameReader, read_episode_info
from mobile_vla.data.normalization import ActionStats, Normalizer

H, W = 720, 1280


def camera_like(rng: np.random.Generator, frames: int) -> np.ndarray:
    """Frames that compress like a camera's: smooth gradients, a moving box, sensor noise."""
    y, x = np.mgrid[0:H, 0:W]
    out = np.empty((frames, H, W, 3), np.uint8)
    for t in range(frames):
        base = np.stack([(x + 8 * t) % 256, (y + 4 * t) % 256, (x + y) // 8 % 256], -1)
        img = base.astype(np.int16) + rng.integers(-6, 7, (H, W, 3))
        img[200:400, 300 + 20 * t : 500 + 20 * t] = (200, 40, 40)
        out[t] = np.clip(img, 0, 255)
    return out


def write(path: Path, images: np.ndarray, chunks: bool | tuple[int, ...]) -> tuple[int, ...]:
    """An episode file as the robot's collector writes one, with the given chunking."""
    n = len(images)
    actions = np.zeros((n, 3), np.float32)
    actions[1:, 0] = 1.15
    with h5py.File(path, "w") as fh:
        ds = fh.create_dataset("images", data=images, chunks=chunks, compression="gzip")
        fh.create_dataset("actions", data=actions)
        fh.create_dataset("language_instruction", data=["go left of the box"])
        fh.attrs["num_frames"] = n
        return tuple(ds.chunks)


def whole(path: Path, n: int) -> None:
    with h5py.File(path, "r") as fh:
        fh["images"][:n]


def by_frame(path: Path, n: int) -> None:
    with FrameReader(path) as reader:
        for t in range(n):  # one call per frame, as the frame cache builds an entry
            reader.frames([t])


def by_frame_before(path: Path, n: int) -> None:
    """FrameReader before the fix: the dataset opened anew per call, default chunk cache."""
    with h5py.File(path, "r") as fh:
        for t in range(n):
            np.stack([fh["images"][t]])


def frames_per_s(read: Callable[[Path, int], None], files: list[Path], n: int) -> float:
    start = time.perf_counter()
    for path in files:
        read(path, n)
    return len(files) * n / (time.perf_counter() - start)


def samples_per_s(dataset: EpisodeDataset, samples: int, seed: int = 0) -> float:
    order = np.random.default_rng(seed).integers(0, len(dataset), samples)
    start = time.perf_counter()
    for i in order:
        dataset[int(i)]
    return samples / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--frames", type=int, default=18)
    parser.add_argument("--samples", type=int, default=24, help="direct-read samples per layout")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n = args.frames
    print(f"{machine()}; {args.episodes} episodes x {n} frames of {H}x{W}, gzip")
    layouts = {"per-frame": (1, H, W, 3), "automatic": True}
    with tempfile.TemporaryDirectory() as tmp:
        files: dict[str, list[Path]] = {k: [] for k in layouts}
        shapes = {}
        for e in range(args.episodes):
            images = camera_like(rng, n)
            for layout, chunks in layouts.items():
                folder = Path(tmp) / layout
                folder.mkdir(exist_ok=True)
                path = folder / f"episode_20250101_0000{e:02d}_1box_left_close_{e:05d}.h5"
                shapes[layout] = write(path, images, chunks)
                files[layout].append(path)
                with FrameReader(path) as reader:  # the same pixels back from both layouts
                    assert np.array_equal(reader.frames([2, 0, n - 1]), images[[2, 0, n - 1]])
        print(f"chunk shapes: per-frame {shapes['per-frame']}, automatic {shapes['automatic']}")
        results: dict[str, dict[str, float]] = {}
        for layout, paths in files.items():
            r = results[layout] = {}
            r["decode, whole episode in one slice"] = frames_per_s(whole, paths, n)
            r["decode, frame by frame (FrameReader)"] = frames_per_s(by_frame, paths, n)
            r["decode, frame by frame, before the fix"] = frames_per_s(by_frame_before, paths, n)
            episodes = [read_episode_info(p) for p in paths]
            cfg = DataConfig(image_size=[224, 224], window_size=8)
            actions = [e.actions[:, :2] for e in episodes]
            stats = ActionStats.from_arrays(["linear_x", "linear_y"], actions)
            norm = Normalizer(stats, "quantile")
            direct = EpisodeDataset(episodes, cfg, norm, frame_source=DirectFrames((224, 224)))
            r["training samples/s, read directly"] = samples_per_s(direct, args.samples)
            cache = FrameCache(Path(tmp) / f"cache_{layout}", (224, 224))
            start = time.perf_counter()
            cache.ensure(episodes)
            r["frame cache build, s per episode"] = (time.perf_counter() - start) / len(paths)
            cached = EpisodeDataset(episodes, cfg, norm, frame_source=cache)
            r["training samples/s, through the frame cache"] = samples_per_s(cached, 2000)
        width = max(len(k) for k in results["per-frame"])
        print(f"\n{'':<{width}}  {'per-frame':>10}  {'automatic':>10}  automatic / per-frame")
        for key in results["per-frame"]:
            a, b = results["per-frame"][key], results["automatic"][key]
            print(f"{key:<{width}}  {a:10.2f}  {b:10.2f}  {b / a:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
