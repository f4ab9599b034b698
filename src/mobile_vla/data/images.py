"""Frame resizing as the robot node does it; no HDF5 here, so the server, the policy runtime
and the robot client load without h5py."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def resize_frames(frames: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize uint8 (T, H, W, 3) frames to ``size`` = (height, width) with antialiased bilinear,
    as the robot node does before JPEG-encoding (no crop: the aspect ratio is not kept)."""
    h, w = int(size[0]), int(size[1])
    if frames.shape[1:3] == (h, w):
        return np.ascontiguousarray(frames)
    out = np.empty((frames.shape[0], h, w, 3), np.uint8)
    for i, frame in enumerate(frames):
        out[i] = np.asarray(Image.fromarray(frame).resize((w, h), Image.BILINEAR))
    return out
