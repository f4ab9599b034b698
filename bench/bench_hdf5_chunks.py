"""Reading the robot's HDF5 frames: h5py's automatic chunking against one chunk per frame.

    python bench/bench_hdf5_chunks.py [--episodes 2] [--frames 18]

The robot's collector may let h5py choose the chunk shape of a gzip-compressed ``images``
dataset (T, 720, 1280, 3): h5py picks a chunk that spans several frames and a slice of each
(e.g. (3, 90, 160, 1)). Read frame by frame through h5py's default 1 MiB chunk cache, every
such chunk is decompressed again for each frame it holds. This measures, side by side in one
process on the same pixels, frames/s for both layouts, read

* as before: ``images[t]`` per frame, default chunk cache;
* as ``FrameReader`` reads now: each run of consecutive frames in one slice, 64 MiB cache;

for two access patterns: whole episodes (what the frame cache and the LeRobot export do) and
8-frame training windows ending at every frame (what training without the frame cache does).
Prints the ratios: automatic / per-frame chunking for each reader, and now / before.
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

from mobile_vla.data.hdf5 import FrameReader

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
    with h5py.File(path, "w") as fh:
        ds = fh.create_dataset("images", data=images, chunks=chunks, compression="gzip")
        fh.create_dataset("actions", data=np.zeros((len(images), 3), np.float32))
        return tuple(ds.chunks)


def before(path: Path, indices: list[int]) -> np.ndarray:
    with h5py.File(path, "r") as fh:
        images = fh["images"]
        return np.stack([images[t] for t in indices])


def now(path: Path, indices: list[int]) -> np.ndarray:
    with FrameReader(path) as reader:
        return reader.frames(indices)


def patterns(frames: int) -> dict[str, list[list[int]]]:
    windows = [list(range(max(0, t - 7), t + 1)) for t in range(frames)]
    return {"whole episode": [list(range(frames))], "8-frame windows": windows}


def rate(
    read: Callable[[Path, list[int]], np.ndarray], files: list[Path], reads: list[list[int]]
) -> float:
    n = 0
    start = time.perf_counter()
    for path in files:
        for idx in reads:
            n += len(read(path, idx))
    return n / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--frames", type=int, default=18)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"machine: {machine()}; {args.episodes} episodes x {args.frames} frames of {H}x{W}, gzip")
    with tempfile.TemporaryDirectory() as tmp:
        files: dict[str, list[Path]] = {"per-frame": [], "automatic": []}
        shapes = {}
        for e in range(args.episodes):
            images = camera_like(rng, args.frames)
            for layout, chunks in (("per-frame", (1, H, W, 3)), ("automatic", True)):
                path = Path(tmp) / f"{layout}_{e}.h5"
                shapes[layout] = write(path, images, chunks)
                files[layout].append(path)
            # both readers give the same pixels on both layouts
            for layout in files:
                idx = [3, 1, 2, 2, args.frames - 1]
                assert np.array_equal(now(files[layout][-1], idx), images[idx])
                assert np.array_equal(before(files[layout][-1], idx), images[idx])
        print(f"chunk shapes: per-frame {shapes['per-frame']}, automatic {shapes['automatic']}")
        for name, reads in patterns(args.frames).items():
            r = {
                (layout, reader.__name__): rate(reader, files[layout], reads)
                for layout in files
                for reader in (before, now)
            }
            print(f"\n{name} (frames/s read):")
            for (layout, reader), value in r.items():
                print(f"  {layout:<10} {reader:<7} {value:8.1f}")
            for reader in ("before", "now"):
                ratio = r[("automatic", reader)] / r[("per-frame", reader)]
                print(f"  automatic / per-frame chunking, {reader}: {ratio:.2f}x")
            print(
                "  now / before, automatic chunking: "
                f"{r[('automatic', 'now')] / r[('automatic', 'before')]:.2f}x; per-frame: "
                f"{r[('per-frame', 'now')] / r[('per-frame', 'before')]:.2f}x"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
