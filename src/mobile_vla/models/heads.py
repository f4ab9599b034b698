"""Action heads: fuse the window's context vectors and predict an action chunk.

A head is a *trunk* (LSTM, MLP or a small GPT) that turns (B, W, F) context features into one
latent vector per sample, and an *output* that maps the latent to the chunk in the configured
action space:

* ``continuous``: (B, N, D) normalized actions (tanh-bounded when the normalization is
  bounded), trained with Huber or MSE and per-dimension weights; a ``gripper`` dimension is a
  logit trained with BCE;
* ``discrete``: (B, N, D, n_bins) logits over uniform bins of the normalized range [-1, 1];
* ``classes``: (B, N, K) logits over a fixed action set (e.g. the 9 teleoperation keys).

``latent`` is what representation analysis compares (for the LSTM, h_n of the last layer).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mobile_vla.config import HeadConfig
from mobile_vla.models.backbones.builtin import Block


@dataclass
class HeadOutput:
    logits: torch.Tensor  # continuous: (B, N, D); discrete: (B, N, D, bins); classes: (B, N, K)
    latent: torch.Tensor  # (B, hidden)
    # the action-token output of each distinct (frame, instruction) the batch encoded (U, F),
    # before any instruction embedding is appended, and its instruction: what an auxiliary
    # loss on the action token reads (set by VLAPolicy.forward)
    frames: tuple[torch.Tensor, list[str]] | None = None


def teleop_action_set(action_dims: list[str], speed: float = 1.15) -> list[list[float]]:
    """The 9 teleoperation keys: {-speed, 0, speed} over linear_x and linear_y, others 0."""
    out = []
    for vx, vy in itertools.product((-speed, 0.0, speed), repeat=2):
        out.append([vx if d == "linear_x" else vy if d == "linear_y" else 0.0 for d in action_dims])
    return out


class LSTMTrunk(nn.Module):
    def __init__(self, in_dim: int, cfg: HeadConfig) -> None:
        super().__init__()
        self.lstm = nn.LSTM(
            in_dim,
            cfg.hidden_size,
            cfg.num_layers,
            batch_first=True,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
        )
        self.skip_padding = cfg.per_step

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The latent after the window's last real frame (B, H). Padding frames are fed as
        zeros, or, with ``per_step``, skipped: each row's real frames (one contiguous run,
        padded before or after) are moved to the front, and the state after the last of them
        is read — the LSTM is causal, so what follows does not change it."""
        if not self.skip_padding:
            _, (h_n, _) = self.lstm(x * mask[..., None])
            return h_n[-1]
        real = mask.bool()
        count = real.sum(1).clamp(min=1)
        first = real.float().argmax(1)
        steps = torch.arange(x.shape[1], device=x.device)
        take = (first[:, None] + steps).clamp(max=x.shape[1] - 1)
        aligned = x.gather(1, take[..., None].expand(-1, -1, x.shape[2]))
        out, _ = self.lstm(aligned)
        return out[torch.arange(x.shape[0], device=x.device), count - 1]

    def every_step(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The latent after every frame (B, W, H) of windows whose real frames come first
        (``per_step`` training windows); outputs at padding positions are left to the loss
        mask."""
        real = mask.bool()
        if bool((real[:, :-1] < real[:, 1:]).any()):
            raise ValueError("per-step windows must start with their real frames")
        out, _ = self.lstm(x)
        return out


class MLPTrunk(nn.Module):
    def __init__(self, in_dim: int, window: int, cfg: HeadConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim * window
        for _ in range(cfg.num_layers):
            layers += [nn.Linear(width, cfg.hidden_size), nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = cfg.hidden_size
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net((x * mask[..., None]).flatten(1))


class GPTTrunk(nn.Module):
    def __init__(self, in_dim: int, window: int, cfg: HeadConfig) -> None:
        super().__init__()
        heads = next(h for h in (8, 4, 2, 1) if cfg.hidden_size % h == 0)
        self.inp = nn.Linear(in_dim, cfg.hidden_size)
        self.pos = nn.Parameter(torch.randn(window, cfg.hidden_size) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.hidden_size, heads) for _ in range(cfg.num_layers))
        self.drop = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        h = self.drop(self.inp(x) + self.pos[:n])
        # causal over the real frames; every position sees itself (no empty rows)
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=x.device))
        attn = (causal & mask.bool()[:, None, :]) | torch.eye(n, dtype=torch.bool, device=x.device)
        for block in self.blocks:
            h = block(h, attn)
        return self.norm(h[:, -1])


class ActionHead(nn.Module):
    def __init__(
        self,
        in_dim: int,
        window: int,
        chunk: int,
        action_dims: list[str],
        cfg: HeadConfig,
        bounded: bool,
    ) -> None:
        super().__init__()
        self.cfg, self.chunk, self.dims = cfg, chunk, len(action_dims)
        self.bounded = bounded
        if cfg.type == "lstm":
            self.trunk: nn.Module = LSTMTrunk(in_dim, cfg)
        elif cfg.type == "mlp":
            self.trunk = MLPTrunk(in_dim, window, cfg)
        else:
            self.trunk = GPTTrunk(in_dim, window, cfg)
        if cfg.action_space == "continuous":
            out = chunk * self.dims
        elif cfg.action_space == "discrete":
            out = chunk * self.dims * cfg.n_bins
        else:
            out = chunk * len(cfg.action_set or teleop_action_set(action_dims))
        h = cfg.hidden_size
        self.out = nn.Sequential(
            nn.Linear(h, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, out)
        )
        self.gripper_index = action_dims.index(cfg.gripper) if cfg.gripper else -1

    def forward(
        self, features: torch.Tensor, obs_mask: torch.Tensor, every_step: bool = False
    ) -> HeadOutput:
        """The chunk after the window's last frame; with ``every_step`` (``per_step`` training),
        the chunk after every frame, as B x W rows in window order."""
        # The head is small: it runs in float32 under mixed precision (and oneDNN's CPU LSTM
        # has no bfloat16 kernel).
        with torch.autocast(device_type=features.device.type, enabled=False):
            if every_step:
                latent = self.trunk.every_step(features.float(), obs_mask.float()).flatten(0, 1)
            else:
                latent = self.trunk(features.float(), obs_mask.float())
            y = self.out(latent)
        return self._shape(y, latent)

    def _shape(self, y: torch.Tensor, latent: torch.Tensor) -> HeadOutput:
        b = y.shape[0]
        if self.cfg.action_space == "continuous":
            y = y.view(b, self.chunk, self.dims)
            if self.bounded:
                squashed = torch.tanh(y)
                if self.gripper_index >= 0:  # the gripper stays a logit for BCE
                    keep = torch.zeros_like(y, dtype=torch.bool)
                    keep[..., self.gripper_index] = True
                    squashed = torch.where(keep, y, squashed)
                y = squashed
        elif self.cfg.action_space == "discrete":
            y = y.view(b, self.chunk, self.dims, self.cfg.n_bins)
        else:
            y = y.view(b, self.chunk, -1)
        return HeadOutput(y, latent)


class ActionCodec:
    """Loss and decoding of a head's output in the configured action space."""

    def __init__(
        self, cfg: HeadConfig, action_dims: list[str], action_set_normalized: np.ndarray | None
    ) -> None:
        self.cfg = cfg
        self.dims = len(action_dims)
        weights = cfg.loss_weights or [1.0] * self.dims
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self.gripper_index = action_dims.index(cfg.gripper) if cfg.gripper else -1
        self.action_set = (
            torch.from_numpy(action_set_normalized).float()
            if action_set_normalized is not None
            else None
        )
        self.bin_centers = torch.linspace(-1, 1, cfg.n_bins)

    def to_bins(self, target: torch.Tensor) -> torch.Tensor:
        n = self.cfg.n_bins
        return ((target.clamp(-1, 1) + 1) / 2 * (n - 1)).round().long()

    def to_classes(self, target: torch.Tensor) -> torch.Tensor:
        assert self.action_set is not None
        dist = torch.cdist(target.reshape(-1, self.dims), self.action_set.to(target.device))
        return dist.argmin(-1).view(target.shape[:-1])

    def loss(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean over valid (sample, chunk step) of the weighted per-dimension loss; with
        ``weight`` (the mask's shape) the mean weighted by it."""
        valid = mask.to(logits.dtype)
        if weight is not None:
            valid = valid * weight.to(logits.dtype)
        denom = valid.sum().clamp(min=1.0)
        space = self.cfg.action_space
        if space == "continuous":
            w = self.weights.to(logits.device)
            if self.cfg.loss == "huber":
                per = F.huber_loss(logits, target, reduction="none", delta=1.0)
            else:
                per = F.mse_loss(logits, target, reduction="none")
            if self.gripper_index >= 0:
                g = self.gripper_index
                per = per.clone()
                per[..., g] = 0.0
                bce = F.binary_cross_entropy_with_logits(
                    logits[..., g], (target[..., g] > 0).to(logits.dtype), reduction="none"
                )
                w = w.clone()
                w[g] = 0.0
                per_step = (per * w).sum(-1) / w.sum().clamp(min=1e-8)
                per_step = per_step + self.cfg.gripper_loss_ratio * bce
            else:
                per_step = (per * w).sum(-1) / w.sum().clamp(min=1e-8)
        elif space == "discrete":
            ce = F.cross_entropy(
                logits.flatten(0, 2), self.to_bins(target).flatten(), reduction="none"
            ).view(target.shape)
            w = self.weights.to(logits.device)
            per_step = (ce * w).sum(-1) / w.sum().clamp(min=1e-8)
        else:
            classes = self.to_classes(target)
            per_step = F.cross_entropy(
                logits.flatten(0, 1), classes.flatten(), reduction="none"
            ).view(target.shape[:-1])
            if self.cfg.class_weights:  # a weighted mean, as F.cross_entropy(weight=) takes it
                w = torch.tensor(self.cfg.class_weights, device=logits.device)[classes]
                return (per_step * w * valid).sum() / (w * valid).sum().clamp(min=1e-8)
        return (per_step * valid).sum() / denom

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """Head output -> normalized actions (B, N, D)."""
        space = self.cfg.action_space
        if space == "continuous":
            out = logits
            if self.gripper_index >= 0:
                out = out.clone()
                out[..., self.gripper_index] = torch.where(
                    logits[..., self.gripper_index] > 0, 1.0, -1.0
                )
            return out
        if space == "discrete":
            return self.bin_centers.to(logits.device)[logits.argmax(-1)]
        assert self.action_set is not None
        return self.action_set.to(logits.device)[logits.argmax(-1)]
