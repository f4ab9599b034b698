"""LLaVA (``llava-hf/llava-1.5-7b-hf`` and the other ``LlavaForConditionalGeneration``
checkpoints): a CLIP vision tower, a two-layer MLP projector and a Llama / Vicuna / Mistral
language model, through ``transformers.LlavaModel`` (the generation checkpoint loads into it).
Layout and groups: :mod:`.decoder`; one image span is the vision tower's patch features (its
CLS token too when ``vision_feature_select_strategy`` is ``full``).
"""

from __future__ import annotations

from typing import Any

from mobile_vla.models.backbones.decoder import DecoderVLMBackbone

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class LlavaBackbone(DecoderVLMBackbone):
    name = "llava"
    model_class = "LlavaModel"
    default_id = "llava-hf/llava-1.5-7b-hf"
    image_mean, image_std = CLIP_MEAN, CLIP_STD

    def _geometry(self, conf: Any) -> None:
        self.hidden_size = conf.text_config.hidden_size
        vision = conf.vision_config
        self.image_size = (vision.image_size, vision.image_size)
        cls = 1 if conf.vision_feature_select_strategy == "full" else 0
        self.num_image_tokens = (vision.image_size // vision.patch_size) ** 2 + cls
