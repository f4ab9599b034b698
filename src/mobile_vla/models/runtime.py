"""The policy's runtime: observe a frame, act, reset: what evaluation, serving and DAgger
collection all drive a trained policy through (as LeRobot's ``select_action`` / ``reset``).

:class:`PolicyController` keeps the window's per-frame context vectors in a ring buffer (so a
step encodes one new frame), turns predicted chunks into one command per step
(:class:`ChunkExecutor`: the first action, the first ``k``, or ACT's temporal ensembling with
weights ``exp(-m * age)``) and maps the predicted dimensions to the robot's
``[linear_x, linear_y, angular_z]`` (:func:`to_command`); :func:`act_many` answers several
sessions of one policy with one forward pass.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mobile_vla.config import Config
from mobile_vla.data.commands import to_command
from mobile_vla.data.images import resize_frames

CHUNK_MODES = ("first", "first_k", "ensemble")


@dataclass(frozen=True)
class ChunkSpec:
    """How a stream of predicted chunks becomes one action per step, in one word for the
    server, evaluation, the study and the CLI: ``mode`` first (the first action of each new
    chunk), first_k (execute ``k`` actions of a chunk, then predict again) or ensemble (ACT's
    temporal ensemble of every chunk that covers the step, weights exp(-``decay`` * i))."""

    mode: str = "first"
    k: int = 1
    decay: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in CHUNK_MODES:
            raise ValueError(f"chunk mode must be one of {CHUNK_MODES}, got {self.mode!r}")
        if self.k < 1:
            raise ValueError(f"chunk k must be >= 1, got {self.k}")

    def settings(self) -> dict[str, Any]:
        """The keys ``metrics.json`` records them under."""
        return {"chunk_mode": self.mode, "chunk_k": self.k, "ensemble_decay": self.decay}


FIRST = ChunkSpec()  # the default: the first action of every new chunk


class ChunkExecutor:
    """Turns a stream of predicted chunks (N, D) into one action per step."""

    def __init__(self, spec: ChunkSpec = FIRST) -> None:
        self.mode, self.k, self.decay = spec.mode, spec.k, spec.decay
        self.reset()

    def reset(self) -> None:
        self.queue: deque[np.ndarray] = deque()
        self.history: list[tuple[int, np.ndarray]] = []  # (step predicted, chunk)
        self.step = 0

    def needs_prediction(self) -> bool:
        return self.mode != "first_k" or not self.queue

    def __call__(self, chunk: np.ndarray | None) -> np.ndarray:
        t = self.step
        self.step += 1
        if self.mode == "first":
            assert chunk is not None
            return chunk[0]
        if self.mode == "first_k":
            if chunk is not None:
                self.queue.extend(chunk[: self.k])
            return self.queue.popleft()
        assert chunk is not None
        self.history.append((t, chunk))
        self.history = [(s, c) for s, c in self.history if t - s < len(c)]
        preds = np.stack([c[t - s] for s, c in self.history])  # oldest prediction first
        w = np.exp(-self.decay * np.arange(len(preds)))  # ACT: w_i = exp(-m * i), i=0 oldest
        return (preds * (w / w.sum())[:, None]).sum(0).astype(np.float32)


class PolicyController:
    """A trained policy behind the controller interface.

    With ``cache_features`` (the default, ``post`` history) each step encodes only the new
    frame and keeps the window's context vectors in a ring buffer; without it, the raw frames
    are kept and the whole window is re-encoded every step (what the history cache saves).
    ``camera`` transforms each frame first (e.g. :func:`robot_camera`)."""

    def __init__(
        self,
        policy: Any,
        cfg: Config,
        chunk: ChunkSpec = FIRST,
        cache_features: bool = True,
        camera: Any = None,
    ) -> None:
        self.policy, self.cfg = policy, cfg
        self.window_size = cfg.data.window_size
        self.size = tuple(cfg.data.image_size)
        self.executor = ChunkExecutor(chunk)
        self.cache = cache_features and cfg.backbone.history == "post"
        self.camera = camera
        self.reset(None)

    def reset(self, scenario: Any) -> None:
        self.buffer: deque[torch.Tensor] = deque(maxlen=self.window_size)
        self.executor.reset()
        self.last_chunk: np.ndarray | None = None
        self.steps = 0

    @property
    def device(self) -> torch.device:
        return self.policy.action_token.device

    def frame_tensor(self, image: np.ndarray) -> torch.Tensor:
        """One camera frame (any size, uint8 HxWx3) as the model takes it: (3, H, W)."""
        if self.camera is not None:
            image = self.camera(image)
        frame = torch.from_numpy(resize_frames(image[None], self.size)[0].transpose(2, 0, 1))
        return frame.to(self.device)

    def push(self, item: torch.Tensor) -> None:
        """Add a frame's context vector (history cache) or the frame itself to the history."""
        self.buffer.append(item)
        self.steps += 1

    @torch.no_grad()
    def observe(self, image: np.ndarray, instruction: str) -> None:
        """Add one camera frame (any size, uint8 HxWx3) to the history."""
        frame = self.frame_tensor(image)
        if self.cache:
            self.push(self.policy.frame_features(frame[None], [instruction])[0])
        else:
            self.push(frame)

    def window(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The history as one padded window (W, ...) and its mask (W,)."""
        items = list(self.buffer)
        pad = self.window_size - len(items)
        window = torch.stack([items[0]] * pad + items)
        mask = torch.tensor([False] * pad + [True] * len(items), device=self.device)
        return window, mask

    @torch.no_grad()
    def chunk(self, instruction: str) -> np.ndarray:
        """Physical action chunk (N, D) from the current history."""
        window, mask = self.window()
        if self.cache:
            out = self.policy.head_forward(window[None], mask[None])
        else:
            out = self.policy(
                {"images": window[None], "instruction": [instruction], "obs_mask": mask[None]}
            )
        self.last_chunk = self.policy.to_physical(self.policy.decode(out))[0]
        return self.last_chunk

    def command(self, chunk: np.ndarray | None) -> np.ndarray:
        """The step's command from a new chunk (or None when the executor needs none)."""
        return to_command(self.executor(chunk), self.policy.action_dims)

    def act(self, image: np.ndarray, instruction: str) -> np.ndarray:
        self.observe(image, instruction)
        chunk = self.chunk(instruction) if self.executor.needs_prediction() else None
        return self.command(chunk)


@torch.no_grad()
def act_many(
    controllers: Sequence[PolicyController], images: Sequence[np.ndarray], texts: Sequence[str]
) -> list[np.ndarray]:
    """One control step of several controllers that share a policy (distinct sessions), in
    one forward pass each for the frames and for the heads: what :meth:`PolicyController.act`
    gives each, up to floating-point summation order. History cache only."""
    if not controllers:
        return []
    policy = controllers[0].policy
    assert all(c.policy is policy and c.cache for c in controllers)
    frames = torch.stack([c.frame_tensor(im) for c, im in zip(controllers, images, strict=True)])
    feats = policy.frame_features(frames, list(texts))
    for c, f in zip(controllers, feats, strict=True):
        c.push(f)
    need = [i for i, c in enumerate(controllers) if c.executor.needs_prediction()]
    chunks: dict[int, np.ndarray] = {}
    if need:
        windows, masks = zip(*(controllers[i].window() for i in need), strict=True)
        out = policy.head_forward(torch.stack(windows), torch.stack(masks))
        physical = policy.to_physical(policy.decode(out))
        for k, i in enumerate(need):
            controllers[i].last_chunk = chunks[i] = physical[k]
    return [c.command(chunks.get(i)) for i, c in enumerate(controllers)]
