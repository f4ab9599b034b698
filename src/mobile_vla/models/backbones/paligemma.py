"""PaliGemma (``google/paligemma-3b-pt-224``): SigLIP vision tower + linear projector + Gemma.

Sequence, as PaliGemma's processor lays it out, plus the action token(s)::

    [image features] <bos> prompt tokens \\n [action token(s)] <eos>

The image and prompt form the bidirectional prefix (``token_type_ids`` 0); the action tokens
and EOS are the causal suffix. In ``pre`` history mode the window's frames come one after the
other at the start. Groups: ``vision`` (SigLIP), ``resampler`` (projector), ``text_embedding``,
``decoder_layers`` (Gemma layers), ``decoder_other`` (final norm). LoRA goes into Gemma.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mobile_vla.models.backbones.decoder import DecoderVLMBackbone
from mobile_vla.models.backbones.sequence import fill, gather_actions, pack

DEFAULT_ID = "google/paligemma-3b-pt-224"
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


class PaliGemmaBackbone(DecoderVLMBackbone):
    """Its parts (``vision_tower``, ``multi_modal_projector``, ``language_model``), groups and
    special tokens are :class:`DecoderVLMBackbone`'s; its layout (image first, a bidirectional
    prefix) is its own."""

    name = "paligemma"
    model_class = "PaliGemmaModel"
    default_id = DEFAULT_ID
    image_mean, image_std = SIGLIP_MEAN, SIGLIP_STD

    def _geometry(self, conf: Any) -> None:
        self.hidden_size = conf.text_config.hidden_size
        size = conf.vision_config.image_size
        self.image_size = (size, size)
        self.num_image_tokens = (size // conf.vision_config.patch_size) ** 2

    def max_window(self) -> int:
        positions = self.model.config.text_config.max_position_embeddings
        return max(1, (positions - 64) // self.num_image_tokens)

    def _run(
        self, rows: list, image_features: torch.Tensor, action_embeds: torch.Tensor
    ) -> torch.Tensor:
        packed = pack(rows, self.pad, self.placeholder).to(image_features.device)
        embeds = fill(self.lm.embed_tokens(packed.input_ids), packed, image_features, action_embeds)
        # prefix (image + prompt) attends bidirectionally; action tokens and EOS are causal
        suffix = torch.cumsum(packed.action_mask.long(), dim=1) > 0
        out = self.model(
            inputs_embeds=embeds, attention_mask=packed.attention_mask, token_type_ids=suffix.long()
        )
        return gather_actions(out.last_hidden_state, packed, action_embeds.shape[0])

    def _rows(self, texts: Sequence[str], frames: list[list[bool]], n_act: int) -> list:
        rows = []
        for t, valid in zip(texts, frames, strict=True):
            ids = self.tokenizer(self.prompt(t), add_special_tokens=False)["input_ids"]
            row: list = [("image", self.num_image_tokens, v) for v in valid]
            row += [
                ("ids", [self.bos, *ids, *self.newline]),
                ("action", n_act),
                ("ids", [self.eos]),
            ]
            rows.append(row)
        return rows
