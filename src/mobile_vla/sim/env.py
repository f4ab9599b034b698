"""The navigation environment: MuJoCo physics, the robot's camera, and the success judge.

    env = NavEnv(SimConfig())
    obs = env.reset(make_scenario(seed=3, layout="1box", side="left", distance="far"))
    obs, info = env.step([1.15, 1.15, 0.0])      # body-frame [linear_x, linear_y, angular_z]
    env.outcome()                                 # success / collision / passed side / steps

Success (``shared/specs/metrics.md``): the robot ends inside the goal region in front of the
target, having passed the obstacle on the instructed side, without any collision, within the
step limit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mobile_vla.config import SimConfig
from mobile_vla.sim.arena import scenario_xml
from mobile_vla.sim.gl import ensure_gl_backend
from mobile_vla.sim.scenario import ROBOT_HALF, Scenario


def load_mujoco() -> Any:
    """MuJoCo, imported once a headless GL backend is chosen (MuJoCo reads ``MUJOCO_GL`` when
    it is first imported). Called when an environment is made, not when this module is
    imported, so importing the simulator's code needs no OpenGL."""
    ensure_gl_backend()
    import mujoco

    return mujoco


@dataclass
class Outcome:
    success: bool
    collision: bool
    in_goal: bool
    passed_side: str | None
    steps: int
    final_x: float
    final_y: float
    hit: str | None = None  # what the robot first touched: "obstacle", "target", "wall"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class NavEnv:
    """One robot in one scenario at a time; ``reset`` builds the scenario's world."""

    def __init__(self, cfg: SimConfig | None = None, render: bool = True) -> None:
        self.cfg = cfg or SimConfig()
        self.render_enabled = render
        self.mj = load_mujoco()
        self.model: Any = None  # mujoco.MjModel
        self.data: Any = None  # mujoco.MjData
        self.renderer: Any = None  # mujoco.Renderer
        self.scenario: Scenario | None = None
        self._robot_geoms: set[int] = set()
        self.steps = 0
        self.hit: str | None = None  # what the robot first touched; None: no collision yet
        self.passed_side: str | None = None
        self.trajectory: list[tuple[float, float, float]] = []

    # ---- lifecycle --------------------------------------------------------------------
    def reset(self, scenario: Scenario) -> dict[str, Any]:
        self.close_renderer()
        h, w = self.cfg.image_size
        xml = scenario_xml(scenario, (h, w), self.cfg.physics_timestep)
        self.model = self.mj.MjModel.from_xml_string(xml)
        self.data = self.mj.MjData(self.model)
        self.scenario = scenario
        robot_id = self.mj.mj_name2id(self.model, self.mj.mjtObj.mjOBJ_BODY, "robot")
        self._robot_geoms = {
            g for g in range(self.model.ngeom) if self.model.geom_bodyid[g] == robot_id
        }
        self._qadr = [
            self.model.jnt_qposadr[self.mj.mj_name2id(self.model, self.mj.mjtObj.mjOBJ_JOINT, j)]
            for j in ("x", "y", "yaw")
        ]
        self.data.qpos[self._qadr[2]] = scenario.start_yaw
        self.mj.mj_forward(self.model, self.data)
        if self.render_enabled:
            self.renderer = self.mj.Renderer(self.model, h, w)
        self.steps = 0
        self.hit = None
        self.passed_side = None
        self.trajectory = [self.pose]
        return self.observation()

    def close_renderer(self) -> None:
        if self.renderer is not None:
            self.renderer.close()
            self.renderer = None

    def close(self) -> None:
        self.close_renderer()

    def __enter__(self) -> NavEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- state ----------------------------------------------------------------------
    @property
    def collision(self) -> bool:
        """Whether the robot has touched anything this episode."""
        return self.hit is not None

    @property
    def pose(self) -> tuple[float, float, float]:
        """(x, y, yaw) of the robot in the world frame."""
        assert self.data is not None, "call reset() first"
        q = self.data.qpos
        return float(q[self._qadr[0]]), float(q[self._qadr[1]]), float(q[self._qadr[2]])

    def render(self) -> np.ndarray:
        """The front camera's RGB frame, uint8 (H, W, 3)."""
        if self.renderer is None:
            raise RuntimeError("this NavEnv was created with render=False")
        self.renderer.update_scene(self.data, camera="front")
        return self.renderer.render().copy()

    def observation(self) -> dict[str, Any]:
        assert self.scenario is not None
        obs: dict[str, Any] = {"instruction": self.scenario.instruction, "pose": self.pose}
        if self.render_enabled:
            obs["image"] = self.render()
        return obs

    # ---- dynamics ---------------------------------------------------------------------
    def step(self, action: np.ndarray | list[float]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Apply a body-frame velocity command for one control period (1 / control_hz)."""
        assert self.model is not None and self.data is not None and self.scenario is not None
        a = np.zeros(3)
        cmd = np.asarray(action, dtype=np.float64).reshape(-1)[:3]
        a[: cmd.shape[0]] = cmd
        a = np.clip(np.nan_to_num(a), -2 * self.cfg.speed, 2 * self.cfg.speed)
        prev_x = self.pose[0]
        for _ in range(self.cfg.substeps):
            yaw = self.data.qpos[self._qadr[2]]
            c, s = math.cos(yaw), math.sin(yaw)
            self.data.ctrl[0] = c * a[0] - s * a[1]
            self.data.ctrl[1] = s * a[0] + c * a[1]
            self.data.ctrl[2] = a[2]
            self.mj.mj_step(self.model, self.data)
            if not self.collision:
                self.hit = self._touching()
        self.steps += 1
        x, y, _ = self.pose
        self._track_passing(prev_x, x, y)
        self.trajectory.append(self.pose)
        return self.observation(), {"collision": self.collision, "steps": self.steps}

    def _touching(self) -> str | None:
        """What the robot touches now ("obstacle", "target", "wall" or a geom's name), or
        None."""
        d = self.data
        for i in range(d.ncon):
            con = d.contact[i]
            if con.dist < 0 and (
                (con.geom1 in self._robot_geoms) != (con.geom2 in self._robot_geoms)
            ):
                other = con.geom2 if con.geom1 in self._robot_geoms else con.geom1
                return touched_thing(
                    self.mj.mj_id2name(self.model, self.mj.mjtObj.mjOBJ_GEOM, other)
                )
        return None

    def _track_passing(self, prev_x: float, x: float, y: float) -> None:
        s = self.scenario
        assert s is not None
        lo, hi = s.obstacle_x
        centre = (lo + hi) / 2
        if self.passed_side is None and prev_x < centre <= x:
            y_lo, y_hi = s.obstacle_y
            if y - ROBOT_HALF >= y_hi - 0.02:
                self.passed_side = "left"
            elif y + ROBOT_HALF <= y_lo + 0.02:
                self.passed_side = "right"
            else:
                self.passed_side = "through"

    def outcome(self) -> Outcome:
        assert self.scenario is not None
        x, y, _ = self.pose
        in_goal = self.scenario.in_goal(x, y)
        success = (
            in_goal
            and not self.collision
            and self.passed_side == self.scenario.side
            and self.steps <= self.cfg.max_steps
        )
        return Outcome(
            success, self.collision, in_goal, self.passed_side, self.steps, x, y, self.hit
        )


def touched_thing(geom: str | None) -> str:
    """The kind of thing a geom of the arena is: "obstacle", "target", "wall", else its name."""
    name = geom or "unnamed"
    for kind in ("obstacle", "target", "wall"):
        if name.startswith(kind):
            return kind
    return name
