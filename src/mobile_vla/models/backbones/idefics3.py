"""Idefics3 (``HuggingFaceM4/Idefics3-8B-Llama3``) and SmolVLM (``HuggingFaceTB/SmolVLM-*``,
the same architecture): a SigLIP vision tower, a pixel-shuffle connector and a Llama language
model, through ``transformers.Idefics3Model``. Each frame is one image (no splitting into
tiles): ``(side / patch)^2 / scale_factor^2`` tokens, between the family's
``<fake_token_around_image>`` tokens when the tokenizer has them. Layout and groups:
:mod:`.decoder`.
"""

from __future__ import annotations

from typing import Any

import torch

from mobile_vla.models.backbones.decoder import DecoderVLMBackbone


class Idefics3Backbone(DecoderVLMBackbone):
    name = "idefics3"
    model_class = "Idefics3Model"
    default_id = "HuggingFaceM4/Idefics3-8B-Llama3"
    vision_attr, projector_attr, lm_attr = "vision_model", "connector", "text_model"
    image_open_token = image_close_token = "<fake_token_around_image>"
    image_mean, image_std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def _geometry(self, conf: Any) -> None:
        self.hidden_size = conf.text_config.hidden_size
        vision = conf.vision_config
        self.image_size = (vision.image_size, vision.image_size)
        patches = (vision.image_size // vision.patch_size) ** 2
        self.num_image_tokens = patches // conf.scale_factor**2

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return super().image_features(pixels[:, None])  # one image per sample
