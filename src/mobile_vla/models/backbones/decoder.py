"""The shared part of adapters whose VLM is a vision tower, a projector and a decoder-only
language model that takes image features in place of placeholder tokens (LLaVA, Idefics3 /
SmolVLM, Qwen2-VL; PaliGemma shares the parts and tokens, with a layout of its own). A family
sets where those three parts live and, if its layout has them, the tokens that open and close
an image; the sequence is::

    <bos> [open] [image features] [close] ... prompt tokens \\n [action token(s)] <eos>

with one image span per frame in ``pre`` history mode (a padded history frame is masked).
Groups: ``vision``, ``resampler`` (the projector / connector), ``text_embedding``,
``decoder_layers``, ``decoder_other`` (final norm). LoRA goes into the language model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mobile_vla.models.backbones.hf import HFBackbone
from mobile_vla.models.backbones.sequence import Packed, fill, gather_actions, pack

LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class DecoderVLMBackbone(HFBackbone):
    """See the module docstring. Subclasses name the parts (attribute names on the
    ``transformers`` model) and :meth:`_geometry`; :meth:`image_features` returns one
    (tokens, D) block per image, stacked."""

    lora_targets = LLAMA_LORA_TARGETS
    vision_attr = "vision_tower"
    projector_attr = "multi_modal_projector"
    lm_attr = "language_model"
    image_open_token: str = ""  # a token before each image span, when the family has one
    image_close_token: str = ""

    @property
    def lm(self) -> nn.Module:
        return getattr(self.model, self.lm_attr)

    def _token_ids(self) -> None:
        tok = self.tokenizer
        self.bos, self.eos = tok.bos_token_id, tok.eos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos
        self.placeholder = self.pad
        self.newline = tok("\n", add_special_tokens=False)["input_ids"]
        self.image_open = self._optional_token(self.image_open_token)
        self.image_close = self._optional_token(self.image_close_token)

    def _optional_token(self, token: str) -> list[int]:
        if not token:
            return []
        tid = self.tokenizer.convert_tokens_to_ids(token)
        return [] if tid is None or tid == self.tokenizer.unk_token_id else [tid]

    def groups(self) -> dict[str, list[nn.Module]]:
        return {
            "vision": [getattr(self.model, self.vision_attr)],
            "resampler": [getattr(self.model, self.projector_attr)],
            "text_embedding": [self.lm.embed_tokens],
            "text": [],
            "decoder_layers": list(self.lm.layers),
            "decoder_other": [self.lm.norm],
        }

    def lora_scope(self) -> nn.Module:
        return self.lm

    def max_window(self) -> int:
        positions = self.model.config.text_config.max_position_embeddings
        return max(1, (positions - 64) // (self.num_image_tokens + 2))

    def _positions(self, rows: list, packed: Packed) -> torch.Tensor | None:
        """Position ids for the language model; None: its own (0, 1, 2, ...)."""
        return None

    def _run(
        self, rows: list, image_features: torch.Tensor, action_embeds: torch.Tensor
    ) -> torch.Tensor:
        packed = pack(rows, self.pad, self.placeholder).to(image_features.device)
        embeds = fill(self.lm.embed_tokens(packed.input_ids), packed, image_features, action_embeds)
        pos = self._positions(rows, packed)
        hidden = self.lm(
            inputs_embeds=embeds,
            attention_mask=packed.attention_mask,
            position_ids=None if pos is None else pos.to(embeds.device),
        ).last_hidden_state
        return gather_actions(hidden, packed, action_embeds.shape[0])

    def _rows(self, texts: Sequence[str], frames: list[list[bool]], n_act: int) -> list:
        rows = []
        for t, valid in zip(texts, frames, strict=True):
            ids = self.tokenizer(self.prompt(t), add_special_tokens=False)["input_ids"]
            row: list = [("ids", [self.bos])]
            for v in valid:
                if self.image_open:
                    row.append(("ids", self.image_open))
                row.append(("image", self.num_image_tokens, v))
                if self.image_close:
                    row.append(("ids", self.image_close))
            row += [("ids", [*ids, *self.newline]), ("action", n_act), ("ids", [self.eos])]
            rows.append(row)
        return rows

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return stacked(self.model.get_image_features(pixel_values=pixels).pooler_output)


def stacked(features: Any) -> torch.Tensor:
    """A family's image features as one (N, tokens, D) tensor (some return one per image)."""
    return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features
