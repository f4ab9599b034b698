"""Kosmos-2 (``microsoft/kosmos-2-patch14-224``), the backbone of the Mobile-VLA study.

Loaded through ``transformers.Kosmos2Model`` (the generation checkpoint loads into it; its LM
head is not needed). The sequence follows Kosmos-2's own layout::

    <s> <image> [64 image features] </image> prompt tokens [action token(s)] </s>

with one image span per frame in ``pre`` history mode. Groups: ``vision`` (CLIP ViT),
``resampler`` (the image-to-text projection with its latent queries), ``text_embedding``
(token embeddings), ``decoder_layers`` (the 24 LLM layers), ``decoder_other`` (final norm).
LoRA goes into the language model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mobile_vla.models.backbones.hf import HFBackbone
from mobile_vla.models.backbones.sequence import fill, gather_actions, pack

DEFAULT_ID = "microsoft/kosmos-2-patch14-224"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Kosmos2Backbone(HFBackbone):
    name = "kosmos2"
    lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    model_class = "Kosmos2Model"
    default_id = DEFAULT_ID
    image_mean, image_std = CLIP_MEAN, CLIP_STD

    def _geometry(self, conf: Any) -> None:
        self.hidden_size = conf.text_config.embed_dim
        size = conf.vision_config.image_size
        self.image_size = (size, size)
        self.num_image_tokens = conf.latent_query_num

    def _token_ids(self) -> None:
        conf = self.model.config
        tok = self.tokenizer
        self.boi = tok.convert_tokens_to_ids("<image>")
        self.eoi = tok.convert_tokens_to_ids("</image>")
        self.bos, self.eos = tok.bos_token_id, tok.eos_token_id
        self.pad = (
            conf.text_config.pad_token_id
            if conf.text_config.pad_token_id is not None
            else tok.pad_token_id
        )
        self.placeholder = tok.unk_token_id if tok.unk_token_id is not None else self.eos

    @property
    def text(self) -> nn.Module:
        return self.model.text_model.model

    def groups(self) -> dict[str, list[nn.Module]]:
        return {
            "vision": [self.model.vision_model],
            "resampler": [self.model.image_to_text_projection],
            "text_embedding": [self.text.embed_tokens],
            "text": [],
            "decoder_layers": list(self.text.layers),
            "decoder_other": [self.text.layer_norm],
        }

    def lora_scope(self) -> nn.Module:
        return self.model.text_model

    def max_window(self) -> int:
        positions = self.model.config.text_config.max_position_embeddings
        return max(1, (positions - 64) // (self.num_image_tokens + 2))

    def _run(
        self, rows: list, image_features: torch.Tensor, action_embeds: torch.Tensor
    ) -> torch.Tensor:
        packed = pack(rows, self.pad, self.placeholder).to(image_features.device)
        embeds = fill(
            self.text.embed_tokens(packed.input_ids), packed, image_features, action_embeds
        )
        mask = packed.attention_mask
        # Kosmos-2 positions count non-padding tokens from padding_idx + 1.
        pos = (torch.cumsum(mask, dim=1) * mask + self.text.embed_positions.padding_idx).long()
        hidden = self.model.text_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=pos
        ).last_hidden_state
        return gather_actions(hidden, packed, action_embeds.shape[0])

    def _rows(self, texts: Sequence[str], frames: list[list[bool]], n_act: int) -> list:
        rows = []
        for t, valid in zip(texts, frames, strict=True):
            ids = self.tokenizer(self.prompt(t), add_special_tokens=False)["input_ids"]
            row: list = [("ids", [self.bos])]
            for v in valid:
                row += [
                    ("ids", [self.boi]),
                    ("image", self.num_image_tokens, v),
                    ("ids", [self.eoi]),
                ]
            row += [("ids", ids), ("action", n_act), ("ids", [self.eos])]
            rows.append(row)
        return rows
