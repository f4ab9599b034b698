"""MJCF of one scenario: floor, walls, obstacles, target, and the omni-wheel robot.

The robot is a holonomic base on three joints (slide x, slide y, hinge yaw) driven by velocity
actuators; the commanded body-frame ``[linear_x, linear_y, angular_z]`` is rotated into the world
frame each control step. Its camera looks forward from the front of the base, tilted down.
"""

from __future__ import annotations

import math

from mobile_vla.sim.scenario import ROBOT_HALF, WALL_Y, Scenario

ROBOT_MASS = 12.0
CAMERA_HEIGHT = 0.32
CAMERA_TILT_DEG = 12.0
CAMERA_FOVY = 70.0


def _f(values: tuple[float, ...] | list[float]) -> str:
    return " ".join(f"{v:.4f}" for v in values)


def _target_xml(s: Scenario) -> str:
    x, y, rgba = s.target_x, s.target_y, _f(s.appearance.target_rgba)
    if s.target == "bottle":
        return f"""
    <body name="target" pos="{x:.4f} {y:.4f} 0">
      <geom name="target_body" type="cylinder" size="0.038 0.09" pos="0 0 0.09" rgba="{rgba}"/>
      <geom name="target_neck" type="cylinder" size="0.016 0.035" pos="0 0 0.215"
            rgba="{rgba}"/>
      <geom name="target_cap" type="cylinder" size="0.018 0.01" pos="0 0 0.26"
            rgba="0.9 0.9 0.9 1"/>
    </body>"""
    walls = [
        ("target_bottom", "0 0 0.01", "0.15 0.11 0.01"),
        ("target_w1", "0.14 0 0.09", "0.01 0.11 0.09"),
        ("target_w2", "-0.14 0 0.09", "0.01 0.11 0.09"),
        ("target_w3", "0 0.1 0.09", "0.15 0.01 0.09"),
        ("target_w4", "0 -0.1 0.09", "0.15 0.01 0.09"),
    ]
    geoms = "\n".join(
        f'      <geom name="{n}" type="box" pos="{p}" size="{sz}" rgba="{rgba}"/>'
        for n, p, sz in walls
    )
    return f"""
    <body name="target" pos="{x:.4f} {y:.4f} 0">
{geoms}
    </body>"""


def scenario_xml(s: Scenario, image_size: tuple[int, int], timestep: float) -> str:
    a = s.appearance
    h, w = image_size
    far_x = s.target_x + 0.8
    wall_len = (far_x + 0.8) / 2
    wall_cx = far_x - wall_len
    level = a.light_level
    tilt = math.radians(CAMERA_TILT_DEG)
    up = (math.sin(tilt), 0.0, math.cos(tilt))
    boxes = "\n".join(
        f'    <geom name="obstacle{i}" type="box" pos="{b.x:.4f} {b.y:.4f} {b.hz:.4f}" '
        f'size="{b.hx:.4f} {b.hy:.4f} {b.hz:.4f}" rgba="{_f(b.rgba)}"/>'
        for i, b in enumerate(s.boxes)
    )
    rh = ROBOT_HALF
    return f"""<mujoco model="mobile_vla_arena">
  <option timestep="{timestep}" integrator="implicitfast" gravity="0 0 -9.81"/>
  <visual>
    <global offwidth="{max(w, 64)}" offheight="{max(h, 64)}"/>
    <quality shadowsize="0" offsamples="0"/>
    <headlight ambient="{0.25 * level:.3f} {0.25 * level:.3f} {0.25 * level:.3f}"
               diffuse="{0.2 * level:.3f} {0.2 * level:.3f} {0.2 * level:.3f}" specular="0 0 0"/>
  </visual>
  <asset>
    <texture name="floor_tex" type="2d" builtin="{a.floor_builtin}" rgb1="{_f(a.floor_rgb1)}"
             rgb2="{_f(a.floor_rgb2)}" width="64" height="64"/>
    <material name="floor_mat" texture="floor_tex"
              texrepeat="{a.floor_repeat:.2f} {a.floor_repeat:.2f}"/>
  </asset>
  <worldbody>
    <light name="sun" directional="true" dir="{_f(a.light_dir)}" castshadow="false"
           diffuse="{0.7 * level:.3f} {0.7 * level:.3f} {0.7 * level:.3f}"/>
    <geom name="floor" type="plane" size="6 6 0.1" material="floor_mat" contype="0"
          conaffinity="0"/>
    <geom name="wall_left" type="box" pos="{wall_cx:.3f} {WALL_Y + 0.05} 0.6"
          size="{wall_len:.3f} 0.05 0.6" rgba="{_f(a.wall_rgb)} 1"/>
    <geom name="wall_right" type="box" pos="{wall_cx:.3f} {-WALL_Y - 0.05} 0.6"
          size="{wall_len:.3f} 0.05 0.6" rgba="{_f(a.wall_rgb)} 1"/>
    <geom name="wall_far" type="box" pos="{far_x + 0.05:.3f} 0 0.6" size="0.05 {WALL_Y + 0.1} 0.6"
          rgba="{_f(a.wall_rgb)} 1"/>
    <geom name="wall_back" type="box" pos="-0.85 0 0.6" size="0.05 {WALL_Y + 0.1} 0.6"
          rgba="{_f(a.wall_rgb)} 1"/>
{boxes}
{_target_xml(s)}
    <body name="robot" pos="0 0 0">
      <joint name="x" type="slide" axis="1 0 0"/>
      <joint name="y" type="slide" axis="0 1 0"/>
      <joint name="yaw" type="hinge" axis="0 0 1"/>
      <geom name="robot_base" type="box" pos="0 0 0.1" size="{rh} {rh} 0.08" mass="{ROBOT_MASS}"
            rgba="0.15 0.15 0.15 1"/>
      <geom name="robot_mast" type="cylinder" pos="0.08 0 0.25" size="0.02 0.07" mass="0.5"
            rgba="0.1 0.1 0.1 1"/>
      <camera name="front" pos="{rh + 0.01:.3f} 0 {CAMERA_HEIGHT}" fovy="{CAMERA_FOVY}"
              xyaxes="0 -1 0 {_f(up)}"/>
    </body>
  </worldbody>
  <actuator>
    <velocity name="vx" joint="x" kv="600"/>
    <velocity name="vy" joint="y" kv="600"/>
    <velocity name="wz" joint="yaw" kv="40"/>
  </actuator>
</mujoco>
"""
