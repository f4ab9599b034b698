"""``mobile-vla collect``: simulated expert episodes written in the robot's HDF5 format.

Episode ``i`` takes grid cell ``i mod len(cells)`` (layout x side x distance, so every cell gets
the same count) and a scenario seed drawn from ``SeedSequence([seed, k, layout, distance])`` with
``k = i // len(cells)``: the left and the right episode of a (layout, distance, k) share their
seed, hence the same obstacle, target, colours and light, and differ only in the instruction and
the path. Without that pairing every episode looks unique, and a policy can learn which side to
take from the floor colour of each training episode instead of from the instruction (it then
ignores the instruction on new scenes). A collection is a pure function of its arguments,
whatever the number of workers.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mobile_vla.config import DISTANCES, LAYOUTS, SimConfig, config_to_yaml
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


def episode_seed(seed: int, repeat: int, layout: str, distance: str) -> int:
    """The scenario seed of the ``repeat``-th (layout, distance) episode: both sides share it."""
    key = [seed, repeat, LAYOUTS.index(layout), DISTANCES.index(distance)]
    return int(np.random.SeedSequence(key).generate_state(1)[0])


def plan_jobs(episodes: int, cells: Sequence[tuple[str, str, str]], seed: int) -> list[EpisodeJob]:
    jobs = []
    for i in range(episodes):
        layout, side, distance = cells[i % len(cells)]
        seed_i = episode_seed(seed, i // len(cells), layout, distance)
        jobs.append(EpisodeJob(i, seed_i, layout, side, distance))
    return jobs


def episode_filename(job: EpisodeJob) -> str:
    """``episode_<YYYYMMDD>_<HHMMSS>_<layout>_<side>_<distance>_<index>.h5`` (the robot's
    naming; the time stamp is synthetic, one second per episode, so names are reproducible)."""
    stamp = _BASE_TIME + dt.timedelta(seconds=job.index)
    return (
        f"episode_{stamp:%Y%m%d}_{stamp:%H%M%S}_{job.layout}_{job.side}_{job.distance}_"
        f"{job.index:05d}.h5"
    )


_worker_env = None
MIN_CORRECTED_FRAMES = 3
OTHER_SIDE = {"left": "right", "right": "left"}


def counterfactual_filename(job: EpisodeJob) -> str:
    """The counterfactual twin's file name: the other side's scenario, suffix ``_cf``."""
    other = replace(job, side=OTHER_SIDE[job.side])
    return episode_filename(other).removesuffix(".h5") + "_cf.h5"


def _run_job(args: tuple[EpisodeJob, SimConfig, str, bool]) -> list[EpisodeResult]:
    from mobile_vla.data.hdf5 import swap_left_right
    from mobile_vla.sim.env import NavEnv
    from mobile_vla.sim.expert import run_counterfactual, run_expert
    from mobile_vla.sim.scenario import make_scenario

    global _worker_env
    job, cfg, out, counterfactual = args
    if _worker_env is None or _worker_env.cfg != cfg:
        _worker_env = NavEnv(cfg)
    scenario = make_scenario(job.seed, job.layout, job.side, job.distance, cfg)
    ep = run_expert(_worker_env, scenario, np.random.default_rng([job.seed, 1]))
    results = [_write(job, cfg, out, scenario, ep, {})]
    if counterfactual and ep.executed is not None:
        # the same world instructed the other way, in the same words but for the side
        other = replace(
            make_scenario(job.seed, job.layout, OTHER_SIDE[job.side], job.distance, cfg),
            instruction=swap_left_right(scenario.instruction),
            paraphrased=scenario.paraphrased,
        )
        twin = run_counterfactual(_worker_env, scenario, other, ep.executed)
        if len(twin.actions) >= MIN_CORRECTED_FRAMES:
            source = episode_filename(job).removesuffix(".h5")
            extra = {"counterfactual_of": source, "source": "mobile_vla.sim.counterfactual"}
            path = Path(out) / counterfactual_filename(job)
            results.append(_write(job, cfg, out, other, twin, extra, path))
    return results


def _write(
    job: EpisodeJob,
    cfg: SimConfig,
    out: str,
    scenario: Any,
    ep: Any,
    extra: dict[str, Any],
    path: Path | None = None,
) -> EpisodeResult:
    from mobile_vla.data.hdf5 import write_episode

    path = path or Path(out) / episode_filename(job)
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
            **extra,
        },
    )
    return EpisodeResult(job.index, str(path), ep.outcome.success, len(ep.actions))


def _run_corrected_jobs(
    jobs: Sequence[EpisodeJob],
    cfg: SimConfig,
    out: str,
    controller: Any,
    expert_prob: float,
    bar: Any,
) -> list[EpisodeResult]:
    """Policy-driven, expert-labelled episodes (DAgger), in this process: the controller (a
    trained policy) is not copied into workers."""
    from mobile_vla.sim.env import NavEnv
    from mobile_vla.sim.expert import run_corrected
    from mobile_vla.sim.scenario import make_scenario

    results = []
    with NavEnv(cfg) as env:
        for job in jobs:
            scenario = make_scenario(job.seed, job.layout, job.side, job.distance, cfg)
            rng = np.random.default_rng([job.seed, 2])
            ep = run_corrected(env, scenario, controller, rng, expert_prob)
            bar.update(1)
            if len(ep.actions) < MIN_CORRECTED_FRAMES:
                continue  # collided at once: nothing worth learning from
            extra = {"driven_by": "policy", "expert_prob": expert_prob}
            results.append(_write(job, cfg, out, scenario, ep, extra))
    return results


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
    controller: Any = None,
    expert_prob: float = 0.0,
    start_index: int = 0,
    counterfactual: bool = False,
) -> list[EpisodeResult]:
    """Write ``episodes`` expert episodes into ``out``; returns one result per episode.

    With ``controller`` (a trained policy behind the closed-loop controller interface) the
    policy drives and the expert labels every frame it visits (DAgger, see
    :func:`~mobile_vla.sim.expert.run_corrected`); episodes that end within
    ``MIN_CORRECTED_FRAMES`` frames are not written. ``start_index`` numbers the files from
    there, so a second collection can go into the same folder; an existing file is never
    overwritten. ``counterfactual`` also writes each expert episode's counterfactual twin
    (:func:`~mobile_vla.sim.expert.run_counterfactual`; ``..._cf.h5``, attribute
    ``counterfactual_of``) beside it; the results then hold both files."""
    cfg = cfg or SimConfig()
    if episodes < 1:
        raise MobileVLAError(f"--episodes must be >= 1, got {episodes}")
    if workers < 1:
        raise MobileVLAError(f"--workers must be >= 1, got {workers}")
    if not 0.0 <= expert_prob <= 1.0:
        raise MobileVLAError(f"--expert-prob must be in [0, 1], got {expert_prob}")
    if start_index < 0:
        raise MobileVLAError(f"--start-index must be >= 0, got {start_index}")
    if counterfactual and controller is not None:
        raise MobileVLAError(
            "--counterfactual relabels expert episodes; it cannot be combined with --policy"
        )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MobileVLAError(f"--out '{out}' exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    save_collect_config(out, episodes, cells, seed, cfg)
    ensure_gl_backend()  # chosen once here; spawned workers inherit MUJOCO_GL
    planned = [
        EpisodeJob(j.index + start_index, j.seed, j.layout, j.side, j.distance)
        for j in plan_jobs(episodes, cells, seed)
    ]
    names = [episode_filename(j) for j in planned]
    if counterfactual:
        names += [counterfactual_filename(j) for j in planned]
    taken = [n for n in names if (out / n).exists()]
    if taken:
        raise MobileVLAError(
            f"--out '{out}' already holds {taken[0]} (and {len(taken) - 1} more of this "
            "collection's files); choose another folder or --start-index"
        )
    jobs = [(job, cfg, str(out), counterfactual) for job in planned]
    bar = tqdm(total=len(jobs), desc="collect", unit="ep", disable=not progress)
    results: list[EpisodeResult] = []
    try:
        if controller is not None:
            results = _run_corrected_jobs(planned, cfg, str(out), controller, expert_prob, bar)
        elif workers == 1:
            for job in jobs:
                results += _run_job(job)
                bar.update(1)
        else:
            # spawn: each worker opens its own GL context; forked contexts are not safe.
            with mp.get_context("spawn").Pool(workers) as pool:
                for written in pool.imap_unordered(_run_job, jobs):
                    results += written
                    bar.update(1)
    finally:
        bar.close()
    results.sort(key=lambda r: (r.index, r.path))
    return results
