"""Language reliance in closed loop: a language-blind driver scores ~0, a driver that follows
the instruction's side scores ~1, and the blank and unseen-phrasing runs say what they should."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from mobile_vla.config import SimConfig
from mobile_vla.data.dataset import side_of_instruction
from mobile_vla.evaluation.closed_loop import ExpertReplayController
from mobile_vla.evaluation.language import (
    HELD_OUT_PHRASINGS,
    LanguageReliance,
    format_language,
    language_reliance,
)

SIM = SimConfig(image_size=[32, 32], max_steps=40)


class SideDriver:
    """The scripted expert driving to the side its instruction names (``follow``), or always
    to ``fixed`` whatever it is told (language-blind); an instruction without a side: left."""

    def __init__(self, follow: bool, fixed: str = "left") -> None:
        self.follow, self.fixed = follow, fixed
        self.replay = ExpertReplayController(SIM)

    def reset(self, scenario: Any) -> None:
        side = {1: "left", -1: "right"}.get(side_of_instruction(scenario.instruction), "left")
        self.replay.reset(replace(scenario, side=side if self.follow else self.fixed))

    def act(self, image: np.ndarray, instruction: str) -> np.ndarray:
        return self.replay.act(image, instruction)


def test_a_side_following_driver_scores_one_and_a_blind_one_zero() -> None:
    follows = language_reliance(SideDriver(follow=True), SIM, 8, seed=3)
    assert follows.scenes == 8 and follows.score == 1.0
    assert follows.success.successes == follows.swapped_success.successes == 8
    assert follows.paraphrase_success.successes == 8  # the side word is all it reads
    # blank: it guesses left, so it succeeds on the left scenes only
    lefts = sum(d["side"] == "left" for d in follows.scene_detail)
    assert 0 < lefts < 8 and follows.blank_success.successes == lefts
    blind = language_reliance(SideDriver(follow=False), SIM, 8, seed=3)
    assert blind.score == 0.0
    # it passes left on every run: succeeds when left is asked for, never otherwise
    assert blind.success.successes == lefts and blind.swapped_success.successes == 8 - lefts
    assert all(d["passed"]["own"] == d["passed"]["swapped"] == "left" for d in blind.scene_detail)
    stored = follows.to_json()
    assert stored["swap_follow"]["ci95"][0] > 0.6 and stored["score"] == 1.0
    assert LanguageReliance.from_json(stored) == follows
    text = format_language(blind)
    assert "swap-follow 0/8" in text and f"blank {lefts}/8" in text


def test_held_out_phrasings_are_not_training_templates() -> None:
    from mobile_vla.sim.scenario import CANONICAL, PARAPHRASES

    for target, phrasings in HELD_OUT_PHRASINGS.items():
        seen = {CANONICAL[target], *PARAPHRASES[target]}
        for p in phrasings:
            assert p not in seen and "{side}" in p
            assert side_of_instruction(p.format(side="right")) == -1
