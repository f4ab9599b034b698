"""Data-layer and simulator throughput, measured side by side in one process.

    python bench/bench_data_sim.py [--episodes 8] [--quick]

Prints: simulator control steps/s with rendering at 96x96 and 224x224 (one core), collection
episodes/min (1 worker and 2 workers), and dataset samples/s reading 720x1280 gzip HDF5 files
directly vs through the frame cache, with the ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mobile_vla.config import DataConfig, SimConfig  # noqa: E402
from mobile_vla.data.dataset import EpisodeDataset  # noqa: E402
from mobile_vla.data.frame_cache import DirectFrames, FrameCache  # noqa: E402
from mobile_vla.data.hdf5 import read_episode_info  # noqa: E402
from mobile_vla.data.normalization import ActionStats, Normalizer  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})


def all_cores(saved: set[int]) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, saved)


def bench_sim(size: int, steps: int) -> tuple[float, float]:
    """(steps/s with rendering, steps/s physics only) for the expert driving random scenarios."""
    from mobile_vla.sim.env import NavEnv
    from mobile_vla.sim.scenario import make_scenario

    out = []
    for render in (True, False):
        cfg = SimConfig(image_size=[size, size])
        env = NavEnv(cfg, render=render)
        env.reset(make_scenario(0, "1box", "left", "far", cfg))  # warm-up (GL context)
        done, seed, elapsed = 0, 0, 0.0
        while done < steps:
            env.reset(make_scenario(seed, "2box" if seed % 2 else "1box", "left", "medium", cfg))
            seed += 1
            t0 = time.perf_counter()
            for _ in range(18):
                env.step([1.15, 1.15 if done % 10 < 5 else 0.0, 0.0])
            elapsed += time.perf_counter() - t0
            done += 18
        env.close()
        out.append(done / elapsed)
    return out[0], out[1]


def bench_collect(episodes: int, workers: int) -> float:
    from mobile_vla.sim.collect import collect
    from mobile_vla.sim.scenario import parse_scenarios

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        collect(tmp, episodes, parse_scenarios(None), seed=1, workers=workers, progress=False)
        return episodes / (time.perf_counter() - t0) * 60


def camera_like_frames(n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        base = 90 + 60 * np.sin(xx / 97 + t / 5) + 40 * np.cos(yy / 53)
        img = np.stack([base, base * 0.8 + 30, 255 - base], -1)
        img += rng.normal(0, 6, img.shape).astype(np.float32)  # sensor noise
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def write_robot_files(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"episode_20251106_1415{i:02d}_1box_{'left' if i % 2 else 'right'}.h5"
        with h5py.File(path, "w") as fh:
            fh.create_dataset(
                "images",
                data=camera_like_frames(18, 720, 1280, rng),
                chunks=(1, 720, 1280, 3),
                compression="gzip",
            )
            fh.create_dataset(
                "actions", data=rng.choice([-1.15, 0, 1.15], (18, 3)).astype(np.float32)
            )
        paths.append(path)
    return paths


def bench_dataset(count: int, direct_samples: int, cached_samples: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        episodes = [read_episode_info(p) for p in write_robot_files(folder, count)]
        write_s = time.perf_counter() - t0
        size_mb = sum(e.path.stat().st_size for e in episodes) / 2**20
        cfg = DataConfig(image_size=[224, 224])
        stats = ActionStats.from_arrays(
            ["linear_x", "linear_y"], [e.actions[:, :2] for e in episodes]
        )
        norm = Normalizer(stats, "quantile")
        rng = np.random.default_rng(0)

        direct = EpisodeDataset(episodes, cfg, norm, frame_source=DirectFrames((224, 224)))
        order = rng.integers(0, len(direct), direct_samples)
        direct[0]
        t0 = time.perf_counter()
        for i in order:
            direct[int(i)]
        direct_rate = direct_samples / (time.perf_counter() - t0)

        cache = FrameCache(folder / "cache", (224, 224))
        t0 = time.perf_counter()
        cache.ensure(episodes)
        build_s = time.perf_counter() - t0
        cached = EpisodeDataset(episodes, cfg, norm, frame_source=cache)
        order = rng.integers(0, len(cached), cached_samples)
        t0 = time.perf_counter()
        for i in order:
            cached[int(i)]
        cached_rate = cached_samples / (time.perf_counter() - t0)
    return {
        "files": count,
        "size_mb": size_mb,
        "write_s": write_s,
        "direct": direct_rate,
        "cached": cached_rate,
        "build_s": build_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=8, help="720p files for the data bench")
    parser.add_argument("--quick", action="store_true", help="fewer steps and samples")
    args = parser.parse_args()
    steps = 360 if args.quick else 1800
    saved = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()

    print(f"machine: {machine()}")
    one_core()
    print(
        "settings: simulator pinned to one core; expert-style commands; 10 Hz control, "
        "20 physics substeps per step; EGL/OSMesa headless rendering "
        f"(MUJOCO_GL={os.environ.get('MUJOCO_GL', 'auto')})"
    )
    for size in (96, 224):
        with_render, physics = bench_sim(size, steps)
        print(
            f"  simulator {size}x{size}: {with_render:8.0f} steps/s with rendering, "
            f"{physics:8.0f} steps/s physics only"
        )
    print(f"  (GL backend in use: {os.environ.get('MUJOCO_GL')})")

    n_collect = 12 if args.quick else 48
    one = bench_collect(n_collect, 1)
    all_cores(saved)
    two = bench_collect(n_collect, 2)
    print(
        f"collect ({n_collect} episodes, 18 frames, 224x224, gzip): {one:.0f} episodes/min with "
        f"1 worker, {two:.0f} episodes/min with 2 workers"
    )

    one_core()
    res = bench_dataset(args.episodes, 40 if args.quick else 120, 2000 if args.quick else 8000)
    all_cores(saved)
    print(
        f"dataset ({res['files']} robot-layout files, 18 frames of 720x1280 gzip each, "
        f"{res['size_mb']:.0f} MB; window 8, chunk 10, resized to 224x224; one core):"
    )
    print(f"  direct from HDF5: {res['direct']:8.1f} samples/s")
    print(
        f"  frame cache:      {res['cached']:8.1f} samples/s  "
        f"(one-time build {res['build_s']:.1f} s)"
    )
    print(f"  ratio cache/direct: {res['cached'] / res['direct']:.1f}x")


if __name__ == "__main__":
    main()
