"""Headless OpenGL for MuJoCo: EGL when it works, else OSMesa, chosen once per process tree.

MuJoCo reads ``MUJOCO_GL`` when it is imported, so the choice is made by probing each backend in
a child process before ``mujoco`` is imported here, and exported so worker processes inherit it.
A user's own ``MUJOCO_GL`` is respected.
"""

from __future__ import annotations

import os
import subprocess
import sys

from mobile_vla.errors import MobileVLAError

_BACKENDS = ("egl", "osmesa")
_PROBE = (
    "import mujoco\n"
    "xml = '<mujoco><worldbody><geom size=\".1\"/></worldbody></mujoco>'\n"
    "m = mujoco.MjModel.from_xml_string(xml)\n"
    "r = mujoco.Renderer(m, 16, 16)\n"
    "r.update_scene(mujoco.MjData(m))\n"
    "assert r.render().shape == (16, 16, 3)\n"
)


class RenderBackendError(MobileVLAError):
    pass


def _probe(backend: str) -> bool:
    env = dict(os.environ, MUJOCO_GL=backend, PYOPENGL_PLATFORM=backend)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE], env=env, capture_output=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def ensure_gl_backend() -> str:
    """Set ``MUJOCO_GL`` (and ``PYOPENGL_PLATFORM``) to a working headless backend."""
    chosen = os.environ.get("MUJOCO_GL")
    if chosen:
        os.environ.setdefault("PYOPENGL_PLATFORM", chosen if chosen in _BACKENDS else "")
        if not os.environ["PYOPENGL_PLATFORM"]:
            del os.environ["PYOPENGL_PLATFORM"]
        return chosen
    if "mujoco" in sys.modules:  # too late to choose; MuJoCo picked its default
        return os.environ.get("MUJOCO_GL", "glfw")
    for backend in _BACKENDS:
        if _probe(backend):
            os.environ["MUJOCO_GL"] = backend
            os.environ["PYOPENGL_PLATFORM"] = backend
            return backend
    raise RenderBackendError(
        "no headless OpenGL backend works for MuJoCo: install EGL (Debian: libegl1 libegl-mesa0 "
        "libgl1-mesa-dri) or OSMesa (libosmesa6), or set MUJOCO_GL; `make install` does this"
    )
