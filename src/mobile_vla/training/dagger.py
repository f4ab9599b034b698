"""``mobile-vla dagger``: expert demonstrations, then rounds of the policy driving and the expert
correcting it (DAgger, Ross et al. 2011), each round retrained on everything collected so far.

    round 0:  collect N expert episodes into DATA          train run <name>_r0
    round r:  run <name>_r(r-1) drives N episodes, the expert labels every frame it visits,
              written into DATA beside the others        train run <name>_r<r> from scratch

Behaviour cloning sees only the states the expert visits; a policy that drifts a little
meets states nobody labelled and drifts further (compounding error). The rounds add exactly
those states, labelled with what the expert would do from there. Each round's collection uses
its own scene seed (``seed + r``) and its own file numbers, so no file is overwritten and the
held-out evaluation scenes (``mobile-vla eval``) are never among them.

After every round ``<output_dir>/<name>_dagger.json`` records what the round wrote, how often
the driving policy reached the goal while collecting (on training scenes: a progress signal,
not the held-out figure), and the training time. A rerun continues after the last finished
round (a collected round is not collected again; a round whose training was cut resumes from
its last checkpoint). Round 0 trains on the episodes already in DATA when it holds any (your own
teleoperated episodes, say) and collects expert episodes only into an empty folder.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mobile_vla.config import Config
from mobile_vla.errors import MobileVLAError
from mobile_vla.io import atomic_write_json
from mobile_vla.training.common import TrainStats

log = logging.getLogger(__name__)

ROUND_STRIDE = 100_000  # file numbers of round r start at r * ROUND_STRIDE


@dataclass(frozen=True)
class DaggerRound:
    round: int
    run: str
    driven_by: str  # "expert", "data" (round 0 on episodes already there) or the driving run
    episodes: int  # files this round wrote
    frames: int
    goal_reached: int  # episodes in which the driver reached the goal while collecting
    train_wall_s: float
    train_steps: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DaggerRound:
        return cls(**{f.name: obj[f.name] for f in dataclasses.fields(cls)})


def _round_cfg(cfg: Config, data: Path, name: str) -> Config:
    out = dataclasses.replace(cfg)
    out.data = dataclasses.replace(cfg.data, path=str(data))
    out.trainer = dataclasses.replace(cfg.trainer, run_name=name)
    return out


def summary_path(cfg: Config, name: str) -> Path:
    return Path(cfg.trainer.output_dir) / f"{name}_dagger.json"


def load_rounds(path: Path) -> tuple[list[DaggerRound], dict[str, Any] | None]:
    """The finished rounds of a summary file, and the collection of a round whose training
    had not finished (None when there is none)."""
    if not path.exists():
        return [], None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        return [DaggerRound.from_json(r) for r in obj["rounds"]], obj.get("collected")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise MobileVLAError(
            f"DAgger summary '{path}' is not readable ({exc}); move it away to start over"
        ) from None


def _save(
    path: Path, data: Path, seed: int, done: list[DaggerRound], collected: dict[str, Any] | None
) -> None:
    obj = {"data": str(data), "seed": seed, "rounds": [d.to_json() for d in done]}
    if collected is not None:
        obj["collected"] = collected
    atomic_write_json(path, obj)


def _collect_round(
    cfg: Config,
    data: Path,
    r: int,
    driver: str,
    episodes: int,
    cells: Sequence[tuple[str, str, str]],
    seed: int,
    expert_prob: float,
    workers: int,
    progress: bool,
) -> dict[str, Any]:
    """Round ``r``'s episodes, driven by the expert (round 0) or by ``driver``'s policy with
    the expert's labels; round 0 uses the episodes already in ``data`` when there are any."""
    from mobile_vla.models.runtime import PolicyController
    from mobile_vla.sim.collect import collect
    from mobile_vla.training.runs import load_policy

    if r == 0 and (existing := sorted(data.glob(cfg.data.pattern))):
        return {
            "round": 0,
            "driven_by": "data",
            "episodes": len(existing),
            "frames": 0,
            "goal_reached": 0,
        }
    controller = PolicyController(*load_policy(driver)) if r > 0 else None
    results = collect(
        data,
        episodes,
        cells,
        seed=seed + r,
        workers=workers if controller is None else 1,
        cfg=cfg.sim,
        progress=progress,
        controller=controller,
        expert_prob=expert_prob,
        start_index=r * ROUND_STRIDE,
    )
    return {
        "round": r,
        "driven_by": driver,
        "episodes": len(results),
        "frames": sum(x.frames for x in results),
        "goal_reached": sum(x.success for x in results),
    }


def _train_round(run_cfg: Config, folder: Path, progress: bool) -> Path:
    """The round's run: trained, resumed from its last checkpoint, or found finished."""
    from mobile_vla.training.run import train

    if (folder / "train_stats.json").exists():
        return folder  # trained before the summary was written
    last = (folder / "checkpoints" / "last").exists()
    return train(run_cfg, resume=folder if last else None, progress=progress)


def dagger(
    cfg: Config,
    data: str | Path,
    rounds: int,
    episodes: int,
    cells: Sequence[tuple[str, str, str]],
    seed: int = 0,
    expert_prob: float = 0.0,
    workers: int = 1,
    progress: bool = True,
    on_round: Callable[[DaggerRound], None] | None = None,
) -> list[DaggerRound]:
    """Run rounds 0..``rounds`` (round 0 = expert data); returns every round's record."""
    if rounds < 0:
        raise MobileVLAError(f"--rounds must be >= 0, got {rounds}")
    if episodes < 1:
        raise MobileVLAError(f"--episodes must be >= 1, got {episodes}")
    data = Path(data)
    name = cfg.trainer.run_name or f"dagger-{cfg.train_setup.strategy}-{cfg.backbone.name}"
    path = summary_path(cfg, name)
    done, pending = load_rounds(path)
    for r in range(len(done), rounds + 1):
        run_name = f"{name}_r{r}"
        run_cfg = _round_cfg(cfg, data, run_name)
        if pending is not None and pending["round"] == r:
            collected = pending  # collected before an interruption: not collected twice
        else:
            driver = done[-1].run if r > 0 else "expert"
            collected = _collect_round(
                cfg, data, r, driver, episodes, cells, seed, expert_prob, workers, progress
            )
            if collected["driven_by"] != "data":
                _save(path, data, seed, done, collected)
        log.info("DAgger round %d: %s", r, collected)
        run = _train_round(run_cfg, Path(cfg.trainer.output_dir) / run_name, progress)
        stats = TrainStats.load(run)
        record = DaggerRound(
            round=r,
            run=str(run),
            driven_by=collected["driven_by"],
            episodes=collected["episodes"],
            frames=collected["frames"],
            goal_reached=collected["goal_reached"],
            train_wall_s=round(stats.wall_time_s, 1),
            train_steps=stats.global_step,
        )
        done.append(record)
        _save(path, data, seed, done, None)
        # the trainer's objects form reference cycles that hold the round's memory maps of the
        # feature cache (hundreds of MB per thousand frames); free them before the next round
        gc.collect()
        if on_round is not None:
            on_round(record)
    return done
