"""The VLA policy: backbone (VLM adapter) + learnable action token(s) + action head.

    context = backbone(frames, instruction, action tokens)  # per frame (post) / window (pre)
    chunk   = head(context of the window)                    # (B, fwd_pred_next_n, D)

Readable top to bottom; the trainer, the evaluator and the server all call the same methods:
``frame_features`` (one frame -> its context vector, what the history cache stores),
``head_forward`` (a window of context vectors -> head output), ``forward`` (a batch from the
dataset), ``predict`` (physical actions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mobile_vla.config import Config
from mobile_vla.data.normalization import ActionStats, Normalizer
from mobile_vla.errors import ConfigError
from mobile_vla.models.backbones import Backbone, build_backbone
from mobile_vla.models.heads import ActionCodec, ActionHead, HeadOutput, teleop_action_set
from mobile_vla.models.strategies import resolve


@dataclass
class Contexts:
    """A batch's encoding (:meth:`VLAPolicy.contexts`)."""

    features: torch.Tensor  # (B, W', F): what the head reads (instruction appended if any)
    mask: torch.Tensor  # (B, W'): real frames
    frames: torch.Tensor  # (U, F0): each distinct (frame, instruction)'s action-token output
    texts: list[str]  # (U,): its instruction


class VLAPolicy(nn.Module):
    def __init__(self, cfg: Config, stats: ActionStats, backbone: Backbone | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.action_dims = list(cfg.data.action_dims)
        self.backbone = backbone if backbone is not None else build_backbone(cfg.backbone)
        d = self.backbone.hidden_size
        n_act = cfg.backbone.n_action_tokens
        self.action_token = nn.Parameter(torch.randn(n_act, d) * 0.02)
        self.pre = cfg.backbone.history == "pre"
        self.window = cfg.data.window_size
        self.chunk = cfg.data.fwd_pred_next_n
        data = cfg.data
        self.normalizer = Normalizer(stats, data.normalization, (data.norm_min, data.norm_max))
        bounded = data.normalization in ("minmax", "quantile", "bounds")
        # frozen_text: each frame's context vector is followed by the instruction's sentence
        # embedding, so the head reads the instruction even where the backbone's output does not
        self.instruction_to_head = resolve(cfg.train_setup).instruction_to_head
        extra = self.backbone.sentence_dim if self.instruction_to_head else 0
        if self.instruction_to_head and not extra:
            self.backbone.sentence_embedding([])  # raises: this backbone has no sentence encoder
        self.head = ActionHead(
            n_act * d + extra,
            1 if self.pre else self.window,
            self.chunk,
            self.action_dims,
            cfg.head,
            bounded,
        )
        action_set = None
        if cfg.head.action_space == "classes":
            physical = np.asarray(
                cfg.head.action_set or teleop_action_set(self.action_dims), np.float32
            )
            action_set = self.normalizer.normalize(physical)
            _check_distinct_keys(physical, action_set, cfg.data.normalization)
            weights = cfg.head.class_weights
            if weights and (len(weights) != len(physical) or min(weights) < 0):
                raise ConfigError(
                    f"head.class_weights must give one weight >= 0 per entry of the action set "
                    f"({len(physical)}), got {weights}"
                )
        self.codec = ActionCodec(cfg.head, self.action_dims, action_set)

    def train(self, mode: bool = True) -> VLAPolicy:
        """Train mode for what trains; every backbone module whose parameters are all frozen
        stays in eval mode (no dropout), so a frozen part computes in training exactly what it
        computes in evaluation and what the feature cache stored. Modules without parameters
        (dropout inside a LoRA layer or the head) follow their parent."""
        super().train(mode)
        if mode:
            freeze_eval(self.backbone)
        return self

    # -- the two halves -------------------------------------------------------------------
    def with_instruction(self, ctx: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Context vectors (N, ..., F) -> (N, ..., F + E) with instruction i's sentence
        embedding after every vector of row i, when the strategy gives the head the
        instruction (``frozen_text``); else unchanged."""
        if not self.instruction_to_head:
            return ctx
        emb = self.backbone.sentence_embedding(texts).to(ctx.device, ctx.dtype)
        emb = emb.view(emb.shape[0], *[1] * (ctx.dim() - 2), -1).expand(*ctx.shape[:-1], -1)
        return torch.cat([ctx, emb], dim=-1)

    def frame_context(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """uint8 frames (N, 3, H, W) + one instruction each -> the action-token output (N, F0),
        before any instruction embedding is appended."""
        pixels = self.backbone.preprocess(images)
        return self.backbone.encode_post(pixels, texts, self.action_token).flatten(1)

    def frame_features(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """uint8 frames (N, 3, H, W) + one instruction each -> context vectors (N, F)."""
        return self.with_instruction(self.frame_context(images, texts), texts)

    def contexts(self, batch: dict[str, Any]) -> Contexts:
        """What the head reads for a batch (from images, or from the cached prefix), and the
        action-token output of each distinct (frame, instruction) it encoded.

        Live, with ``post`` history, the dataset's ``frame_id`` (B, W) names each frame
        (equal ids = equal pixels): a frame's context depends only on the frame and the
        instruction, so each distinct (frame, instruction) of the batch is encoded once —
        consecutive windows share W-1 frames, so evaluation does about W times less work."""
        texts = list(batch["instruction"])
        if "prefix_kv" in batch:  # the frozen-prefix feature cache
            ctx = self.backbone.encode_from_prefix(
                batch["prefix_kv"],
                batch["prefix_mask"],
                self.action_token,
                batch.get("prefix_hidden"),
            ).flatten(1)
            index = batch["prefix_index"]
            owner = [""] * len(ctx)
            for row, text in zip(index.tolist(), texts, strict=True):
                for u in row:
                    owner[u] = text
            feats = self.with_instruction(ctx[index], texts)
            return Contexts(feats, batch["obs_mask"], ctx, owner)
        images, obs_mask = batch["images"], batch["obs_mask"]
        b, w = images.shape[:2]
        if self.pre:
            pixels = self.backbone.preprocess(images.flatten(0, 1))
            pixels = pixels.view(b, w, *pixels.shape[1:])
            ctx = self.backbone.encode_pre(pixels, texts, self.action_token, obs_mask).flatten(1)
            feats = self.with_instruction(ctx, texts)[:, None]
            return Contexts(feats, torch.ones(b, 1, device=ctx.device), ctx, texts)
        per_frame = [t for t in texts for _ in range(w)]
        frame_id = batch.get("frame_id")
        if frame_id is None:
            pick, inverse = list(range(b * w)), list(range(b * w))
        else:
            first: dict[tuple[int, str], int] = {}
            pick, inverse = [], []
            for j, key in enumerate(zip(frame_id.flatten().tolist(), per_frame, strict=True)):
                u = first.get(key)
                if u is None:
                    u = first[key] = len(pick)
                    pick.append(j)
                inverse.append(u)
        picked = [per_frame[j] for j in pick]
        ctx = self.frame_context(images.flatten(0, 1)[pick], picked)
        feats = self.with_instruction(ctx, picked)
        index = torch.tensor(inverse, device=feats.device)
        return Contexts(feats[index].view(b, w, -1), obs_mask, ctx, picked)

    def window_features(
        self,
        images: torch.Tensor,
        texts: Sequence[str],
        obs_mask: torch.Tensor,
        frame_id: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 windows (B, W, 3, H, W) -> (features (B, W', F), mask (B, W')); ``frame_id``
        (B, W) names each frame (see :meth:`contexts`)."""
        batch: dict[str, Any] = {"images": images, "instruction": list(texts), "obs_mask": obs_mask}
        if frame_id is not None:
            batch["frame_id"] = frame_id
        c = self.contexts(batch)
        return c.features, c.mask

    def head_forward(
        self, features: torch.Tensor, obs_mask: torch.Tensor, every_step: bool = False
    ) -> HeadOutput:
        return self.head(features, obs_mask, every_step)

    # -- training ---------------------------------------------------------------------------
    def cached_window_features(
        self,
        prefix_kv: torch.Tensor,
        prefix_mask: torch.Tensor,
        index: torch.Tensor,
        texts: Sequence[str],
        prefix_hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Context vectors (B, W, F) from the cached prefix keys/values (U, k, 2, P, D), masks
        (U, P) and, when fusion layers from k up train, hidden states (U, P, D) of a batch's
        distinct frames; ``index`` (B, W) picks each window's; ``texts`` are the windows'
        instructions."""
        batch: dict[str, Any] = {
            "prefix_kv": prefix_kv,
            "prefix_mask": prefix_mask,
            "prefix_index": index,
            "instruction": list(texts),
            "obs_mask": torch.ones(index.shape, dtype=torch.bool, device=index.device),
        }
        if prefix_hidden is not None:
            batch["prefix_hidden"] = prefix_hidden
        return self.contexts(batch).features

    def forward(self, batch: dict[str, Any], every_step: bool = False) -> HeadOutput:
        """The chunk after each window's last frame, or with ``every_step`` (``per_step``
        training windows) after every frame of it (B x W rows); the output also carries the
        distinct frames' action-token outputs (``frames``)."""
        c = self.contexts(batch)
        out = self.head_forward(c.features, c.mask, every_step)
        out.frames = (c.frames, c.texts)
        return out

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, HeadOutput]:
        """The loss of a batch of windows: against the chunk after the last frame (actions
        (B, N, D)), or, for ``per_step`` training windows (actions (B, W, N, D)), after
        every frame."""
        actions, mask = batch["actions"], batch["action_mask"]
        every_step = actions.dim() == 4
        out = self(batch, every_step)
        weight = None
        if every_step and self.training and self.cfg.head.change_weight > 0:
            weight = 1.0 + self.cfg.head.change_weight * command_changes(actions, mask)
            weight = weight.flatten(0, 1)
        if every_step:
            actions, mask = actions.flatten(0, 1), mask.flatten(0, 1)
        return self.codec.loss(out.logits, actions, mask, weight), out

    # -- inference ------------------------------------------------------------------------------
    def decode(self, out: HeadOutput) -> torch.Tensor:
        """Head output -> normalized actions (B, N, D)."""
        return self.codec.decode(out.logits)

    def to_physical(self, normalized: torch.Tensor) -> np.ndarray:
        """Normalized actions -> physical ones, snapped to the teleop keys when
        ``head.snap_to_keys`` > 0 (not the gripper dimension)."""
        out = self.normalizer.denormalize(normalized.detach().float().cpu().numpy())
        snap = self.cfg.head.snap_to_keys
        if snap > 0:
            stats = self.normalizer.stats
            keys = np.maximum(np.abs(stats.min), np.abs(stats.max)).astype(np.float32)
            snapped = np.where(np.abs(out) > snap * keys, np.sign(out) * keys, 0.0)
            if self.codec.gripper_index >= 0:
                snapped[..., self.codec.gripper_index] = out[..., self.codec.gripper_index]
            out = snapped.astype(np.float32)
        return out

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, texts: Sequence[str], obs_mask: torch.Tensor | None = None
    ) -> np.ndarray:
        """Physical action chunks (B, N, D) for uint8 windows (B, W, 3, H, W)."""
        if obs_mask is None:
            obs_mask = torch.ones(images.shape[:2], dtype=torch.bool, device=images.device)
        out = self({"images": images, "instruction": list(texts), "obs_mask": obs_mask})
        return self.to_physical(self.decode(out))


def command_changes(actions: torch.Tensor, mask: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
    """1.0 where a per-step window's chunk entry differs from the command one frame earlier,
    else 0.0: (B, W, N) for actions (B, W, N, D) and masks (B, W, N). Entry (w, j) is the command
    at frame w + j; one frame earlier is entry (w, j - 1), or for j = 0 entry (w - 1, 0). The
    window's first entry has nothing before it in the window and counts as unchanged, and so
    does an entry next to padding."""
    prev, prev_ok = actions.clone(), torch.zeros_like(mask)
    prev[:, :, 1:], prev_ok[:, :, 1:] = actions[:, :, :-1], mask[:, :, :-1]
    prev[:, 1:, 0], prev_ok[:, 1:, 0] = actions[:, :-1, 0], mask[:, :-1, 0]
    changed = (actions - prev).abs().amax(-1) > tol
    return (changed & mask & prev_ok).to(actions.dtype)


def _check_distinct_keys(physical: np.ndarray, normalized: np.ndarray, mode: str) -> None:
    """A classes head labels each target with its nearest key in the normalized space; two keys
    that normalize to one point (quantile clipping maps every value below q01 to -1) would make
    a key unlearnable and relabel its data as the other."""
    for i in range(len(normalized)):
        for j in range(i):
            if np.allclose(normalized[i], normalized[j], atol=1e-6):
                raise ConfigError(
                    f"head.action_set: keys {physical[j].tolist()} and {physical[i].tolist()} "
                    f"become the same class under data.normalization '{mode}' (it clips actions "
                    "outside the training data's range); use data.normalization: minmax with "
                    "head.action_space: classes"
                )


def freeze_eval(module: nn.Module) -> None:
    """Put every submodule that has parameters, none of them trainable, in eval mode."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        module.eval()
        return
    for child in module.children():
        freeze_eval(child)
