"""Scenarios of the navigation task: layouts, appearance and instructions.

Coordinates follow ROS: x forward, y left, metres. The robot starts at the origin facing +x; the
target stands straight ahead behind one (``1box``) or two side-by-side (``2box``) box obstacles,
with free floor on both sides. The *layout and appearance* depend only on the scenario seed,
layout and distance, never on the side: the same layout is passable on the left and on the
right, and only the instruction says which side to take.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mobile_vla.config import DISTANCES, LAYOUTS, SIDES, SimConfig
from mobile_vla.errors import ConfigError

# Gap from the obstacle's back face to the target per distance level, before jitter.
TARGET_GAP = {"close": 0.78, "medium": 0.98, "far": 1.18}
ROBOT_HALF = 0.15
GOAL_BAND = (0.2, 0.6)  # the goal region spans x in [target_x - 0.6, target_x - 0.2]
GOAL_HALF_WIDTH = 0.25  # and |y - target_y| <= 0.25
WALL_Y = 1.4
TIME_PERIOD_LIGHT = {"dawn": 0.55, "morning": 0.95, "evening": 0.65, "night": 0.35}

CANONICAL = {
    "bottle": "Navigate around obstacles and reach the front of the beverage bottle on the {side}",
    "basket": "Navigate to the gray basket on the {side}",
}
PARAPHRASES = {
    "bottle": (
        "Go around the obstacle on the {side} and stop in front of the bottle",
        "Pass the box on the {side} side and drive up to the beverage bottle",
        "Take the {side} way around the obstacles to reach the bottle",
        "Drive around the {side} side of the box and stop at the bottle",
        "Avoid the obstacle by going {side} and reach the drink bottle",
    ),
    "basket": (
        "Go around the obstacle on the {side} and stop at the gray basket",
        "Pass the box on its {side} side and reach the basket",
        "Take the {side} path to the grey basket",
        "Drive to the basket, going around the obstacle on the {side}",
    ),
}


@dataclass(frozen=True)
class Box:
    """An axis-aligned box obstacle: centre (x, y), half sizes (hx, hy, hz), colour."""

    x: float
    y: float
    hx: float
    hy: float
    hz: float
    rgba: tuple[float, float, float, float]


@dataclass(frozen=True)
class Appearance:
    floor_rgb1: tuple[float, float, float]
    floor_rgb2: tuple[float, float, float]
    floor_builtin: str
    floor_repeat: float
    wall_rgb: tuple[float, float, float]
    target_rgba: tuple[float, float, float, float]
    light_dir: tuple[float, float, float]
    light_level: float
    time_period: str


@dataclass(frozen=True)
class Scenario:
    """Everything needed to build one episode's world and judge it."""

    seed: int
    layout: str
    side: str
    distance: str
    target: str
    target_x: float
    target_y: float
    boxes: tuple[Box, ...]
    appearance: Appearance
    start_yaw: float
    instruction: str
    paraphrased: bool = False

    @property
    def name(self) -> str:
        """Scenario as the file-name token: ``1box_left``."""
        return f"{self.layout}_{self.side}"

    @property
    def side_sign(self) -> int:
        return 1 if self.side == "left" else -1

    @property
    def obstacle_x(self) -> tuple[float, float]:
        """x extent (front, back) of the obstacle group."""
        return min(b.x - b.hx for b in self.boxes), max(b.x + b.hx for b in self.boxes)

    @property
    def obstacle_y(self) -> tuple[float, float]:
        """y extent (right edge, left edge) of the obstacle group."""
        return min(b.y - b.hy for b in self.boxes), max(b.y + b.hy for b in self.boxes)

    @property
    def goal_center(self) -> tuple[float, float]:
        return self.target_x - sum(GOAL_BAND) / 2, self.target_y

    def in_goal(self, x: float, y: float) -> bool:
        return (
            self.target_x - GOAL_BAND[1] <= x <= self.target_x - GOAL_BAND[0]
            and abs(y - self.target_y) <= GOAL_HALF_WIDTH
        )


def _rgb(rng: np.random.Generator, lo: float = 0.05, hi: float = 0.95) -> tuple[float, ...]:
    return tuple(float(v) for v in rng.uniform(lo, hi, size=3))


def _appearance(rng: np.random.Generator, target: str, randomize: bool) -> Appearance:
    if not randomize:
        grey = 0.5 if target == "basket" else 0.2
        return Appearance(
            (0.55, 0.55, 0.55),
            (0.45, 0.45, 0.45),
            "checker",
            8.0,
            (0.8, 0.8, 0.75),
            (grey, grey, 0.9 if target == "bottle" else grey, 1.0),
            (0.3, 0.2, -1.0),
            0.95,
            "morning",
        )
    period = str(rng.choice(list(TIME_PERIOD_LIGHT)))
    if target == "basket":
        g = float(rng.uniform(0.4, 0.6))
        target_rgba = (g, g, g + float(rng.uniform(-0.03, 0.03)), 1.0)
    else:
        target_rgba = (*_rgb(rng, 0.1, 0.9), 1.0)
    return Appearance(
        floor_rgb1=_rgb(rng, 0.2, 0.8),
        floor_rgb2=_rgb(rng, 0.2, 0.8),
        floor_builtin=str(rng.choice(["checker", "flat", "gradient"])),
        floor_repeat=float(rng.uniform(4, 14)),
        wall_rgb=_rgb(rng, 0.3, 0.95),
        target_rgba=target_rgba,  # type: ignore[arg-type]
        light_dir=(float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.5, 0.5)), -1.0),
        light_level=TIME_PERIOD_LIGHT[period] * float(rng.uniform(0.85, 1.15)),
        time_period=period,
    )


def make_scenario(
    seed: int, layout: str, side: str, distance: str, cfg: SimConfig | None = None
) -> Scenario:
    """Build the scenario for ``seed``. The layout and look use a generator that does not see
    ``side``, so left and right share them exactly; the instruction uses its own generator."""
    cfg = cfg or SimConfig()
    if layout not in LAYOUTS:
        raise ConfigError(f"scenario layout must be one of {list(LAYOUTS)}, got {layout!r}")
    if side not in SIDES:
        raise ConfigError(f"scenario side must be one of {list(SIDES)}, got {side!r}")
    if distance not in DISTANCES:
        raise ConfigError(f"scenario distance must be one of {list(DISTANCES)}, got {distance!r}")
    rng = np.random.default_rng([seed, LAYOUTS.index(layout), DISTANCES.index(distance)])
    target = str(rng.choice(cfg.targets))
    cx = float(rng.uniform(0.75, 0.85))
    cy = float(rng.uniform(-0.04, 0.04))
    hx = float(rng.uniform(0.12, 0.17))
    hz = float(rng.uniform(0.1, 0.2))
    target_x = cx + hx + TARGET_GAP[distance] + float(rng.uniform(-0.04, 0.04))
    target_y = float(rng.uniform(-0.08, 0.08))
    colours = [(*_rgb(rng), 1.0) for _ in range(2)]
    if not cfg.randomize_appearance:
        colours = [(0.7, 0.5, 0.3, 1.0), (0.6, 0.45, 0.3, 1.0)]
    if layout == "1box":
        hy = float(rng.uniform(0.16, 0.24))
        boxes: tuple[Box, ...] = (Box(cx, cy, hx, hy, hz, colours[0]),)  # type: ignore[arg-type]
    else:
        hy = float(rng.uniform(0.1, 0.13))
        gap = float(rng.uniform(0.02, 0.08))  # too narrow for the robot
        off = hy + gap / 2
        boxes = (
            Box(cx, cy + off, hx, hy, hz, colours[0]),  # type: ignore[arg-type]
            Box(
                cx + float(rng.uniform(-0.03, 0.03)),
                cy - off,
                hx,
                hy,
                float(rng.uniform(0.1, 0.2)),
                colours[1],
            ),  # type: ignore[arg-type]
        )
    appearance = _appearance(rng, target, cfg.randomize_appearance)
    start_yaw = float(np.deg2rad(rng.uniform(-cfg.yaw_jitter_deg, cfg.yaw_jitter_deg)))

    text_rng = np.random.default_rng([seed, 7919, SIDES.index(side)])
    paraphrased = bool(text_rng.random() < cfg.paraphrase_prob)
    template = str(text_rng.choice(PARAPHRASES[target])) if paraphrased else CANONICAL[target]
    return Scenario(
        seed=seed,
        layout=layout,
        side=side,
        distance=distance,
        target=target,
        target_x=target_x,
        target_y=target_y,
        boxes=boxes,
        appearance=appearance,
        start_yaw=start_yaw,
        instruction=template.format(side=side),
        paraphrased=paraphrased,
    )


def parse_scenarios(tokens: Sequence[str] | None) -> list[tuple[str, str, str]]:
    """``["1box_left", "2box_right_far", "all"]`` -> the (layout, side, distance) grid cells.

    A token names a layout and/or side and/or distance; what it leaves out means "all".
    """
    if not tokens:
        tokens = ["all"]
    cells: list[tuple[str, str, str]] = []
    for token in tokens:
        for part in str(token).split(","):
            part = part.strip()
            if not part:
                continue
            words = [] if part == "all" else part.split("_")
            layouts = [w for w in words if w in LAYOUTS] or list(LAYOUTS)
            sides = [w for w in words if w in SIDES] or list(SIDES)
            dists = [w for w in words if w in DISTANCES] or list(DISTANCES)
            unknown = [w for w in words if w not in (*LAYOUTS, *SIDES, *DISTANCES)]
            if unknown:
                raise ConfigError(
                    f"scenario '{part}' has unknown word(s) {unknown}; use layout "
                    f"{list(LAYOUTS)}, side {list(SIDES)}, distance {list(DISTANCES)} joined by _ "
                    "(e.g. 1box_left_far) or 'all'"
                )
            for cell in itertools.product(layouts, sides, dists):
                if cell not in cells:
                    cells.append(cell)
    if not cells:
        raise ConfigError("no scenarios selected")
    return cells
