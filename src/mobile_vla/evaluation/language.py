"""Language reliance in closed loop: does the policy drive where the instruction says?

On each held-out scene (the closed loop's scenario grid and seeds) the policy drives four
times (``shared/specs/metrics.md``, "Language reliance"):

* with the scene's instruction;
* with the same sentence, left and right swapped (the scene is the other side's scenario,
  whose layout and look are the same): ``swap_follow_rate`` is the share of scenes where both
  runs pass the obstacle, each on its instructed side — a language-blind policy passes one
  side whatever it is told and scores ~0, a policy that follows the side scores ~1. It is the
  **language-reliance score**, given with its scene count and Wilson interval;
* with the instruction emptied (``blank_success``): a policy that reads the side can only
  guess it here;
* with a phrasing no training template uses (``paraphrase_success``).

Each success is judged against the side the run's instruction names (the blank run: the
scene's own side).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from mobile_vla.config import SimConfig
from mobile_vla.data.hdf5 import swap_left_right
from mobile_vla.evaluation.closed_loop import Controller, evaluation_jobs, run_episode
from mobile_vla.evaluation.results import wilson_interval

#: phrasings that no collection template (``sim.scenario``: CANONICAL, PARAPHRASES) uses
HELD_OUT_PHRASINGS = {
    "bottle": (
        "Steer {side} of the boxes, then halt before the bottle",
        "Keep to the {side} of the obstacle until you reach the bottle",
    ),
    "basket": (
        "Steer {side} of the boxes, then halt before the basket",
        "Keep to the {side} of the obstacle until you reach the basket",
    ),
}
OTHER = {"left": "right", "right": "left"}


@dataclass(frozen=True)
class Rate:
    """``successes`` of ``episodes`` with a 95% Wilson interval."""

    successes: int
    episodes: int

    @property
    def rate(self) -> float | None:
        return self.successes / self.episodes if self.episodes else None

    def to_json(self) -> dict[str, Any]:
        lo, hi = wilson_interval(self.successes, self.episodes)
        return {
            "successes": self.successes,
            "episodes": self.episodes,
            "rate": self.rate,
            "ci95": [lo, hi],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Rate:
        return cls(int(d["successes"]), int(d["episodes"]))


@dataclass(frozen=True)
class LanguageReliance:
    scenes: int
    seed: int
    swap_follow: Rate
    success: Rate
    swapped_success: Rate
    blank_success: Rate
    paraphrase_success: Rate
    scene_detail: tuple[dict[str, Any], ...] = ()

    @property
    def score(self) -> float | None:
        """The language-reliance score: the swap-follow rate."""
        return self.swap_follow.rate

    def to_json(self) -> dict[str, Any]:
        return {
            "scenes": self.scenes,
            "seed": self.seed,
            "score": self.score,
            "swap_follow": self.swap_follow.to_json(),
            "success": self.success.to_json(),
            "swapped_success": self.swapped_success.to_json(),
            "blank_success": self.blank_success.to_json(),
            "paraphrase_success": self.paraphrase_success.to_json(),
            "scene_detail": list(self.scene_detail),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LanguageReliance:
        return cls(
            int(d["scenes"]),
            int(d["seed"]),
            Rate.from_json(d["swap_follow"]),
            Rate.from_json(d["success"]),
            Rate.from_json(d["swapped_success"]),
            Rate.from_json(d["blank_success"]),
            Rate.from_json(d["paraphrase_success"]),
            tuple(d.get("scene_detail", ())),
        )


def language_reliance(
    controller: Controller, sim_cfg: SimConfig, scenes: int, seed: int, progress: bool = False
) -> LanguageReliance:
    """Drive each of ``scenes`` held-out scenes four times (module docstring)."""
    from tqdm.auto import tqdm

    from mobile_vla.sim.env import NavEnv
    from mobile_vla.sim.scenario import make_scenario

    detail = []
    with NavEnv(sim_cfg) as env:
        jobs = evaluation_jobs(scenes, seed)
        for i, s, layout, side, dist in tqdm(
            jobs, desc="language reliance", unit="scene", disable=not progress
        ):
            own = make_scenario(s, layout, side, dist, sim_cfg)
            swapped = replace(
                make_scenario(s, layout, OTHER[side], dist, sim_cfg),
                instruction=swap_left_right(own.instruction),
            )
            phrasings = HELD_OUT_PHRASINGS[own.target]
            paraphrase = replace(own, instruction=phrasings[i % len(phrasings)].format(side=side))
            runs = {
                "own": run_episode(env, controller, own, i),
                "swapped": run_episode(env, controller, swapped, i),
                "blank": run_episode(env, controller, replace(own, instruction=""), i),
                "paraphrase": run_episode(env, controller, paraphrase, i),
            }
            detail.append(
                {
                    "index": i,
                    "seed": s,
                    "side": side,
                    "passed": {k: r.passed_side for k, r in runs.items()},
                    "success": {k: bool(r.success) for k, r in runs.items()},
                    "follows_swap": runs["own"].passed_side == side
                    and runs["swapped"].passed_side == OTHER[side],
                }
            )
    n = len(detail)

    def count(key: str) -> Rate:
        return Rate(sum(d["success"][key] for d in detail), n)

    return LanguageReliance(
        n,
        seed,
        Rate(sum(d["follows_swap"] for d in detail), n),
        count("own"),
        count("swapped"),
        count("blank"),
        count("paraphrase"),
        tuple(detail),
    )


def format_language(r: LanguageReliance) -> str:
    """The result as ``eval --language`` prints it."""

    def rate(x: Rate) -> str:
        lo, hi = wilson_interval(x.successes, x.episodes)
        return f"{x.successes}/{x.episodes} [{lo:.2f}, {hi:.2f}]"

    return (
        f"language reliance ({r.scenes} held-out scenes, seed {r.seed}): swap-follow "
        f"{rate(r.swap_follow)} (the score; ~0 language-blind, ~1 follows the side)\n"
        f"  success: instructed {rate(r.success)}, swapped {rate(r.swapped_success)}, "
        f"blank {rate(r.blank_success)}, unseen phrasing {rate(r.paraphrase_success)}"
    )
