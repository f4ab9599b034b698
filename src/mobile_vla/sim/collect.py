"""``mobile-vla collect``: simulated expert episodes written in the robot's HDF5 format.

Episode ``i`` takes grid cell ``i mod len(cells)`` (layout x side x distance, so every cell gets
the same count) and scenario seed ``SeedSequence([seed, i])``: a collection is a pure function of
its arguments, whatever the number of workers.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mobile_vla.config import SimConfig, config_to_yaml
from mobile_vla.errors import MobileVLAError
from mobile_vla.io import atomic_write_text
from mobile_vla.sim.gl import ensure_gl_backend

_BASE_TIME = dt.datetime(2026, 1, 1, 9, 0, 0)


@dataclass(frozen=True)
class EpisodeJob:
    index: int
    seed: int
    layout: str
    side: str
    distance: str


@dataclass(frozen=True)
class EpisodeResult:
    index: int
    path: str
    success: bool
    frames: int


def episode_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def plan_jobs(episodes: int, cells: Sequence[tuple[str, str, str]], seed: int) -> list[EpisodeJob]:
    return [EpisodeJob(i, episode_seed(seed, i), *cells[i % len(cells)]) for i in range(episodes)]


def episode_filename(job: EpisodeJob) -> str:
    """``episode_<YYYYMMDD>_<HHMMSS>_<layout>_<side>_<distance>_<index>.h5`` (the robot's
    naming; the time stamp is synthetic, one second per episode, so names are reproducible)."""
    stamp = _BASE_TIME + dt.timedelta(seconds=job.index)
    return (
        f"episode_{stamp:%Y%m%d}_{stamp:%H%M%S}_{job.layout}_{job.side}_{job.distance}_"
        f"{job.index:05d}.h5"
    )


_worker_env = None


def _run_job(args: tuple[EpisodeJob, SimConfig, str]) -> EpisodeResult:
    from mobile_vla.data.hdf5 import write_episode
    from mobile_vla.sim.env import NavEnv
    from mobile_vla.sim.expert import run_expert
    from mobile_vla.sim.scenario import make_scenario

    global _worker_env
    job, cfg, out = args
    if _worker_env is None or _worker_env.cfg != cfg:
        _worker_env = NavEnv(cfg)
    scenario = make_scenario(job.seed, job.layout, job.side, job.distance, cfg)
    ep = run_expert(_worker_env, scenario, np.random.default_rng([job.seed, 1]))
    path = Path(out) / episode_filename(job)
    write_episode(
        path,
        ep.frames,
        ep.actions,
        scenario.instruction,
        ep.event_types,
        attrs={
            "action_chunk_size": 10,
            "time_period": scenario.appearance.time_period,
            "collection_datetime": (_BASE_TIME + dt.timedelta(seconds=job.index)).isoformat(),
            "scenario": scenario.name,
            "distance_level": job.distance,
            "seed": job.seed,
            "target": scenario.target,
            "color_order": ",".join(f"{c:.3f}" for c in scenario.boxes[0].rgba[:3]),
            "paraphrased": int(scenario.paraphrased),
            "teleop_actions": int(cfg.teleop_actions),
            "action_noise": cfg.action_noise,
            "expert_success": int(ep.outcome.success),
            "control_hz": cfg.control_hz,
            "source": "mobile_vla.sim",
        },
    )
    return EpisodeResult(job.index, str(path), ep.outcome.success, len(ep.actions))


def save_collect_config(
    out: Path, episodes: int, cells: Sequence[tuple[str, str, str]], seed: int, cfg: SimConfig
) -> Path:
    """Write the resolved settings beside the episodes, as a config ``collect --config`` takes."""
    path = out / f"collect_seed{seed}.yaml"
    cells_text = " ".join("_".join(c) for c in cells)
    header = (
        f"# mobile-vla collect --out {out} --episodes {episodes} --seed {seed} "
        f"--config {path.name}\n# --scenarios {cells_text}\n"
    )
    atomic_write_text(path, header + config_to_yaml({"seed": seed, "sim": cfg}))
    return path


def collect(
    out: str | Path,
    episodes: int,
    cells: Sequence[tuple[str, str, str]],
    seed: int = 0,
    workers: int = 1,
    cfg: SimConfig | None = None,
    progress: bool = True,
) -> list[EpisodeResult]:
    """Write ``episodes`` expert episodes into ``out``; returns one result per episode."""
    cfg = cfg or SimConfig()
    if episodes < 1:
        raise MobileVLAError(f"--episodes must be >= 1, got {episodes}")
    if workers < 1:
        raise MobileVLAError(f"--workers must be >= 1, got {workers}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MobileVLAError(f"--out '{out}' exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    save_collect_config(out, episodes, cells, seed, cfg)
    ensure_gl_backend()  # chosen once here; spawned workers inherit MUJOCO_GL
    jobs = [(job, cfg, str(out)) for job in plan_jobs(episodes, cells, seed)]
    bar = tqdm(total=len(jobs), desc="collect", unit="ep", disable=not progress)
    results: list[EpisodeResult] = []
    try:
        if workers == 1:
            for job in jobs:
                results.append(_run_job(job))
                bar.update(1)
        else:
            # spawn: each worker opens its own GL context; forked contexts are not safe.
            with mp.get_context("spawn").Pool(workers) as pool:
                for result in pool.imap_unordered(_run_job, jobs):
                    results.append(result)
                    bar.update(1)
    finally:
        bar.close()
    results.sort(key=lambda r: r.index)
    return results
