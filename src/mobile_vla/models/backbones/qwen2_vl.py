"""Qwen2-VL and Qwen2.5-VL (``Qwen/Qwen2-VL-2B-Instruct``, ``Qwen/Qwen2.5-VL-3B-Instruct``):
a ViT over 14 x 14 patches whose 2 x 2 neighbours are merged into one token, and a Qwen2
language model with multimodal rotary positions (M-RoPE: an image token's position is its
(frame, row, column) on the merged grid), through ``transformers.Qwen2VLModel`` /
``Qwen2_5_VLModel``. Each frame is resized to a square of :attr:`IMAGE_SIDE` pixels rounded to
a multiple of patch x merge (224: 64 tokens), patchified as Qwen's image processor does (the
frame repeated over the temporal patch), between ``<|vision_start|>`` and ``<|vision_end|>``.
Layout and groups: :mod:`.decoder`.
"""

from __future__ import annotations

from typing import Any

import torch

from mobile_vla.models.backbones.decoder import DecoderVLMBackbone, stacked
from mobile_vla.models.backbones.sequence import Packed

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIDE = 224


class Qwen2VLBackbone(DecoderVLMBackbone):
    name = "qwen2_vl"
    model_class = "Qwen2VLModel"
    default_id = "Qwen/Qwen2-VL-2B-Instruct"
    vision_attr, projector_attr = "visual", "visual"
    image_open_token, image_close_token = "<|vision_start|>", "<|vision_end|>"
    image_mean, image_std = CLIP_MEAN, CLIP_STD

    def _geometry(self, conf: Any) -> None:
        self.hidden_size = conf.text_config.hidden_size
        vision = conf.vision_config
        self.patch, self.merge = vision.patch_size, vision.spatial_merge_size
        self.temporal = vision.temporal_patch_size
        unit = self.patch * self.merge
        side = max(unit, round(IMAGE_SIDE / unit) * unit)
        self.image_size = (side, side)
        self.grid = side // self.patch  # patches per side
        self.num_image_tokens = (self.grid // self.merge) ** 2

    def groups(self) -> dict[str, list[torch.nn.Module]]:
        groups = super().groups()
        visual = self.model.visual
        groups["vision"] = [m for name, m in visual.named_children() if name != "merger"]
        groups["resampler"] = [visual.merger]  # the patch merger projects into the LM
        return groups

    def patchify(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N * grid^2, C * temporal * patch^2) in the order of Qwen's image
        processor (row-major over merge windows, then within each window)."""
        n, c = pixels.shape[:2]
        g, m, p, t = self.grid, self.merge, self.patch, self.temporal
        x = pixels[:, None].expand(n, t, c, *pixels.shape[2:])
        x = x.reshape(n, t, c, g // m, m, p, g // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(n * g * g, c * t * p * p)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        n = pixels.shape[0]
        thw = torch.tensor([[1, self.grid, self.grid]] * n, device=pixels.device)
        out = self.model.get_image_features(pixel_values=self.patchify(pixels), image_grid_thw=thw)
        return stacked(out.pooler_output)

    def _positions(self, rows: list, packed: Packed) -> torch.Tensor:
        """M-RoPE positions (3, B, L): text tokens count up on all three axes; an image span
        takes (start, start + row, start + column) on the merged grid and advances the count
        by the grid's side, as ``Qwen2VLModel.get_rope_index`` does. Masked spans and padding
        take no positions."""
        side = self.grid // self.merge
        rr = torch.arange(side).repeat_interleave(side)
        cc = torch.arange(side).repeat(side)
        pos = torch.zeros(3, *packed.input_ids.shape, dtype=torch.long)
        for b, row in enumerate(rows):
            at = cur = 0
            for seg in row:
                kind = seg[0]
                n = len(seg[1]) if kind == "ids" else seg[1]
                if kind == "image":
                    if seg[2]:
                        pos[0, b, at : at + n] = cur
                        pos[1, b, at : at + n] = cur + rr
                        pos[2, b, at : at + n] = cur + cc
                        cur += side
                else:
                    pos[:, b, at : at + n] = torch.arange(cur, cur + n)
                    cur += n
                at += n
        return pos


class Qwen25VLBackbone(Qwen2VLBackbone):
    """Qwen2.5-VL: the same layout and positions; its ViT attends within windows."""

    name = "qwen2_5_vl"
    model_class = "Qwen2_5_VLModel"
    default_id = "Qwen/Qwen2.5-VL-3B-Instruct"
