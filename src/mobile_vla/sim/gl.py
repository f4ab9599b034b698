"""Headless OpenGL for MuJoCo: EGL when it works, else OSMesa, chosen once per process tree.

MuJoCo reads ``MUJOCO_GL`` when it is imported, so the choice is made by probing each backend in
a child process before ``mujoco`` is imported here, and exported so worker processes inherit it.
A user's own ``MUJOCO_GL`` is respected.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np

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


class ModelRenderer:
    """Offscreen rendering of many different small models through one GL context.

    ``mujoco.Renderer`` opens a GL context for every model (about 135 ms here); a corpus of
    scenes that each compile their own model only needs a new ``MjrContext`` per model (about
    8 ms), drawn into this renderer's context. The pixels are the same as ``mujoco.Renderer``'s.
    Call :func:`ensure_gl_backend` before the first ``import mujoco`` of the process.
    """

    def __init__(self, width: int, height: int) -> None:
        import mujoco

        self._mj = mujoco
        self.width, self.height = width, height
        self._gl = mujoco.GLContext(width, height)
        self._gl.make_current()

    def render(self, model: Any, data: Any, camera: str) -> np.ndarray:
        """RGB (H, W, 3) uint8 of ``camera`` in the model's current state."""
        mj = self._mj

        if model.vis.global_.offwidth < self.width or model.vis.global_.offheight < self.height:
            raise ValueError(
                f"the model's offscreen buffer ({model.vis.global_.offwidth}x"
                f"{model.vis.global_.offheight}) is smaller than {self.width}x{self.height}"
            )
        self._gl.make_current()
        ctx = mj.MjrContext(model, mj.mjtFontScale.mjFONTSCALE_50.value)
        try:
            mj.mjr_setBuffer(mj.mjtFramebuffer.mjFB_OFFSCREEN, ctx)
            scene = mj.MjvScene(model, maxgeom=model.ngeom + 16)
            cam = mj.MjvCamera()
            cam.type = mj.mjtCamera.mjCAMERA_FIXED
            cam.fixedcamid = model.camera(camera).id
            mj.mjv_updateScene(
                model, data, mj.MjvOption(), None, cam, mj.mjtCatBit.mjCAT_ALL, scene
            )
            viewport = mj.MjrRect(0, 0, self.width, self.height)
            mj.mjr_render(viewport, scene, ctx)
            rgb = np.empty((self.height, self.width, 3), np.uint8)
            mj.mjr_readPixels(rgb, None, viewport, ctx)
        finally:
            ctx.free()
        return np.flipud(rgb).copy()

    def close(self) -> None:
        if self._gl is not None:
            self._gl.free()
            self._gl = None

    def __enter__(self) -> ModelRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
