"""The scripted expert and the episode loop that records what a teleoperator would.

The expert drives into a lane beside the obstacle on the instructed side, holds it past the
obstacle, then centres on the target and stops in the goal region. It is closed-loop (it reads
the robot's pose every step), so it recovers from perturbations: with ``action_noise`` the
*executed* command is sometimes replaced by a random one while the *recorded* action stays the
expert's corrective label (DART-style noise injection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mobile_vla.config import SimConfig
from mobile_vla.data.hdf5 import event_type
from mobile_vla.sim.env import NavEnv, Outcome
from mobile_vla.sim.scenario import ROBOT_HALF, WALL_Y, Scenario

LANE_CLEARANCE = 0.11  # gap between the robot's side and the obstacle's edge in the lane
PASS_MARGIN = 0.08  # how far past the obstacle the robot goes before turning in
STOP_TOLERANCE = 0.06
SAFE_MARGIN = 0.1  # perturbations keep at least this far from anything


@dataclass
class ExpertEpisode:
    frames: np.ndarray  # uint8 (T, H, W, 3)
    actions: np.ndarray  # float32 (T, 3): the command at frame t
    event_types: list[str]
    outcome: Outcome
    perturbed: list[bool] = field(default_factory=list)
    executed: np.ndarray | None = None  # float32 (T, 3): the command sent (noise included)


class Expert:
    """Pose -> body-frame command for one scenario."""

    def __init__(self, scenario: Scenario, cfg: SimConfig) -> None:
        self.s, self.cfg = scenario, cfg
        lo, hi = scenario.obstacle_y
        sign = scenario.side_sign
        edge = hi if sign > 0 else lo
        self.lane_y = edge + sign * (ROBOT_HALF + LANE_CLEARANCE)
        front, back = scenario.obstacle_x
        self.lane_entry_x = front - ROBOT_HALF - 0.06  # body must be in the lane before this
        self.lane_exit_x = back + ROBOT_HALF + PASS_MARGIN
        self.goal_x, self.goal_y = scenario.goal_center

    def target_point(self, x: float, y: float) -> tuple[float, float]:
        """Where the expert heads from (x, y), in world coordinates."""
        if x >= self.lane_exit_x:
            return self.goal_x, self.goal_y
        outward = (y - self.lane_y) * self.s.side_sign  # > 0: further out than the lane
        in_lane = outward >= -(STOP_TOLERANCE + 0.005)
        ty = y if outward > 0 else self.lane_y
        # Advance only while in the lane, or while there is room to finish the side step.
        may_advance = in_lane or x < self.lane_entry_x - 0.12
        return (self.lane_exit_x + 0.2 if may_advance else x), ty

    def act(self, pose: tuple[float, float, float]) -> np.ndarray:
        x, y, yaw = pose
        tx, ty = self.target_point(x, y)
        c, s = math.cos(yaw), math.sin(yaw)
        err = np.array([c * (tx - x) + s * (ty - y), -s * (tx - x) + c * (ty - y)])  # body frame
        speed = self.cfg.speed
        if self.cfg.teleop_actions:
            lin = np.where(np.abs(err) > STOP_TOLERANCE, np.sign(err) * speed, 0.0)
            wz = 0.0 if abs(yaw) < math.radians(4) else -math.copysign(speed, yaw)
        else:
            lin = np.clip(err * self.cfg.control_hz * 0.6, -speed, speed)
            lin[np.abs(err) <= STOP_TOLERANCE / 3] = 0.0
            wz = float(np.clip(-yaw * self.cfg.control_hz * 0.5, -speed, speed))
        return np.array([lin[0], lin[1], wz], dtype=np.float32)

    def clearance(self, x: float, y: float) -> float:
        """Distance from the robot's footprint to the nearest obstacle, target or side wall."""
        s = self.s
        t_hx, t_hy = (0.04, 0.04) if s.target == "bottle" else (0.15, 0.11)
        rects = [(b.x, b.y, b.hx, b.hy) for b in s.boxes] + [(s.target_x, s.target_y, t_hx, t_hy)]
        gaps = [WALL_Y - ROBOT_HALF - abs(y)]
        for cx, cy, hx, hy in rects:
            dx = max(abs(x - cx) - hx - ROBOT_HALF, 0.0)
            dy = max(abs(y - cy) - hy - ROBOT_HALF, 0.0)
            gaps.append(math.hypot(dx, dy))
        return min(gaps)

    def safe_perturbations(self, pose: tuple[float, float, float], steps: int) -> list[np.ndarray]:
        """Teleop-style commands that, held for ``steps`` control periods and one more (the
        expert needs a step to take back over), keep the robot at least ``SAFE_MARGIN`` from
        everything (a straight-line, body-frame = world-frame approximation)."""
        x, y, _ = pose
        step = self.cfg.speed / self.cfg.control_hz
        out = []
        for vx in (-1, 0, 1):
            for vy in (-1, 0, 1):
                if vx == vy == 0:
                    continue
                path = [
                    (x + vx * step * k / 2, y + vy * step * k / 2) for k in range(1, 2 * steps + 3)
                ]
                if min(self.clearance(px, py) for px, py in path) > SAFE_MARGIN:
                    out.append(
                        np.array([vx * self.cfg.speed, vy * self.cfg.speed, 0.0], np.float32)
                    )
        return out

    def done(self, pose: tuple[float, float, float]) -> bool:
        x, y, _ = pose
        return (
            x >= self.lane_exit_x
            and abs(x - self.goal_x) <= STOP_TOLERANCE
            and abs(y - self.goal_y) <= STOP_TOLERANCE
        )


def run_expert(
    env: NavEnv,
    scenario: Scenario,
    rng: np.random.Generator | None = None,
    record_frames: bool = True,
) -> ExpertEpisode:
    """Drive one episode with the expert.

    ``cfg.episode_length > 0`` records exactly that many frames (the expert holds still once
    done); ``0`` runs until the expert has stopped in the goal (the stop frame is recorded), or
    for ``cfg.max_steps`` steps.
    """
    cfg = env.cfg
    rng = rng if rng is not None else np.random.default_rng(scenario.seed)
    expert = Expert(scenario, cfg)
    obs = env.reset(scenario)
    to_completion = cfg.episode_length == 0
    num_frames = cfg.max_steps + 1 if to_completion else cfg.episode_length
    frames, actions, events, perturbed, executed_all = [], [], [], [], []
    noise_left = 0
    noise_action = np.zeros(3, np.float32)
    for t in range(num_frames):
        pose = env.pose
        label = np.zeros(3, np.float32) if expert.done(pose) else expert.act(pose)
        if record_frames:
            frames.append(obs["image"])
        actions.append(label)
        events.append(event_type(t, label))
        if to_completion and not label.any():
            perturbed.append(False)
            break
        # A perturbation holds one random command that cannot reach anything before the expert
        # takes over again, so noisy episodes stay collision-free demonstrations of recovery.
        if noise_left == 0 and cfg.action_noise > 0 and rng.random() < cfg.action_noise:
            candidates = expert.safe_perturbations(pose, cfg.noise_steps)
            if candidates:
                noise_left = cfg.noise_steps
                noise_action = candidates[int(rng.integers(len(candidates)))]
        executed = label
        if noise_left > 0:
            noise_left -= 1
            executed = noise_action
        perturbed.append(executed is not label)
        executed_all.append(np.asarray(executed, np.float32))
        if t < num_frames - 1:
            obs, _ = env.step(executed)
    h, w = cfg.image_size
    return ExpertEpisode(
        frames=np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8),
        actions=np.stack(actions).astype(np.float32),
        event_types=events,
        outcome=env.outcome(),
        perturbed=perturbed,
        executed=np.stack(executed_all) if executed_all else np.zeros((0, 3), np.float32),
    )


def run_counterfactual(
    env: NavEnv, scenario: Scenario, other: Scenario, executed: np.ndarray
) -> ExpertEpisode:
    """The counterfactual relabelling of an expert episode: the robot retraces the episode's
    path (``executed``, in ``scenario``'s world) while the expert of ``other`` — the same world
    instructed the other way — labels every pose it passes. The episode ends where those labels
    stop being demonstrations: once the robot is level with the obstacle on the side ``other``
    does not take (:func:`wrong_side`), or at a collision. Its frames are the source's first
    frames; its labels say what to do there had the instruction been the other one, so every
    frame of it needs the instruction (the source's frames after the start show the side
    already taken, and ask little of it)."""
    cfg = env.cfg
    expert = Expert(other, cfg)
    obs = env.reset(scenario)
    frames, actions, events = [], [], []
    for t, command in enumerate(executed):
        pose = env.pose
        if wrong_side(other, pose):
            break
        label = np.zeros(3, np.float32) if expert.done(pose) else expert.act(pose)
        frames.append(obs["image"])
        actions.append(label)
        events.append(event_type(t, label))
        obs, info = env.step(command)
        if info["collision"]:
            break
    h, w = cfg.image_size
    return ExpertEpisode(
        frames=np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8),
        actions=np.stack(actions).astype(np.float32) if actions else np.zeros((0, 3), np.float32),
        event_types=events,
        outcome=env.outcome(),
        perturbed=[False] * len(actions),
    )


def wrong_side(scenario: Scenario, pose: tuple[float, float, float]) -> bool:
    """The robot is level with the obstacle on the side the instruction did not name: from
    here the expert's lane is behind the obstacle, so its labels stop being demonstrations."""
    x, y, _ = pose
    front, back = scenario.obstacle_x
    lo, hi = scenario.obstacle_y
    level = front - ROBOT_HALF < x < back + ROBOT_HALF
    beyond = y - ROBOT_HALF > hi - 0.05 if scenario.side_sign < 0 else y + ROBOT_HALF < lo + 0.05
    return level and beyond


def run_corrected(
    env: NavEnv,
    scenario: Scenario,
    controller: object,
    rng: np.random.Generator,
    expert_prob: float = 0.0,
    hold_frames: int = 3,
) -> ExpertEpisode:
    """One episode driven by ``controller`` (anything with ``reset(scenario)`` and
    ``act(image, instruction) -> command``, e.g. a trained policy) and labelled by the expert:
    the recorded action of every frame is what the expert commands from the pose the policy
    brought the robot to (DAgger). With ``expert_prob`` a step executes the expert's command
    instead (DAgger's beta). The episode ends at a collision (the frame that collided is not
    recorded), when the robot is level with the obstacle on the wrong side, ``hold_frames``
    frames after the expert first says stop, or at ``cfg.max_steps``."""
    cfg = env.cfg
    expert = Expert(scenario, cfg)
    obs = env.reset(scenario)
    controller.reset(scenario)  # type: ignore[attr-defined]
    frames, actions, events, perturbed = [], [], [], []
    done_frames = 0
    for t in range(cfg.max_steps):
        pose = env.pose
        if wrong_side(scenario, pose):
            break
        label = np.zeros(3, np.float32) if expert.done(pose) else expert.act(pose)
        frames.append(obs["image"])
        actions.append(label)
        events.append(event_type(t, label))
        command = np.asarray(controller.act(obs["image"], obs["instruction"]), np.float32)  # type: ignore[attr-defined]
        use_expert = expert_prob > 0 and rng.random() < expert_prob
        perturbed.append(not use_expert)
        done_frames = done_frames + 1 if not label.any() else 0
        if done_frames >= hold_frames:
            break
        obs, info = env.step(label if use_expert else command)
        if info["collision"]:
            break
    h, w = cfg.image_size
    return ExpertEpisode(
        frames=np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8),
        actions=np.stack(actions).astype(np.float32) if actions else np.zeros((0, 3), np.float32),
        event_types=events,
        outcome=env.outcome(),
        perturbed=perturbed,
    )
