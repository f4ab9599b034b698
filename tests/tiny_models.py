"""Tiny randomly initialised VLMs of the real ``transformers`` classes, saved to a folder and
loaded back through the adapters' real loading code (the way ``transformers`` tests itself)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mobile_vla.sim.scenario import CANONICAL, PARAPHRASES

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "</image>", "<grounding>"]


def _vocab() -> list[str]:
    words: set[str] = {"left", "right", "center", "\n"}
    for text in [*CANONICAL.values(), *(p for ps in PARAPHRASES.values() for p in ps)]:
        words |= set(re.findall(r"\w+|[^\w\s]", text.lower()))
    return SPECIALS + sorted(words)


def save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_vocab())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(r"\w+|[^\w\s]|\n", behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>", "</image>"],
    )
    fast.save_pretrained(folder)


def _vision(image_size: int, **extra: object) -> dict:
    """The tiny vision tower every family here gets: 2 layers of width 32, 8 px patches."""
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": 8,
        **extra,
    }


def save_tiny_kosmos2(folder: Path, image_size: int = 32) -> Path:
    import torch
    from transformers import Kosmos2Config, Kosmos2Model

    torch.manual_seed(0)
    n = len(_vocab())
    cfg = Kosmos2Config(
        text_config={
            "vocab_size": n,
            "embed_dim": 32,
            "layers": 3,
            "attention_heads": 4,
            "ffn_dim": 64,
            "max_position_embeddings": 512,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        vision_config=_vision(image_size),
        latent_query_num=8,
    )
    Kosmos2Model(cfg).save_pretrained(folder)
    save_tokenizer(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
            }
        )
    )
    return folder


def save_tiny_paligemma(folder: Path, image_size: int = 32) -> Path:
    import torch
    from transformers import PaliGemmaConfig, PaliGemmaModel

    torch.manual_seed(0)
    n = len(_vocab())
    cfg = PaliGemmaConfig(
        text_config={
            "model_type": "gemma",
            "vocab_size": n + 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        vision_config=_vision(image_size, model_type="siglip_vision_model", projection_dim=32),
        image_token_index=n,
        projection_dim=32,
        hidden_size=32,
    )
    PaliGemmaModel(cfg).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def _llama_text(n: int, model_type: str = "llama") -> dict:
    return {
        "model_type": model_type,
        "vocab_size": n + 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def save_tiny_llava(folder: Path, image_size: int = 32) -> Path:
    import torch
    from transformers import LlavaConfig, LlavaModel

    torch.manual_seed(0)
    n = len(_vocab())
    cfg = LlavaConfig(
        text_config=_llama_text(n),
        vision_config=_vision(image_size, model_type="clip_vision_model", projection_dim=32),
        image_token_index=n,
        vision_feature_layer=-1,
    )
    LlavaModel(cfg).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def save_tiny_idefics3(folder: Path, image_size: int = 32) -> Path:
    import torch
    from transformers import Idefics3Config, Idefics3Model

    torch.manual_seed(0)
    n = len(_vocab())
    cfg = Idefics3Config(
        text_config=_llama_text(n),
        vision_config=_vision(image_size),
        image_token_id=n,
        scale_factor=2,
    )
    Idefics3Model(cfg).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def save_tiny_qwen2_vl(folder: Path, version: str = "2") -> Path:
    """Qwen2-VL (``version`` "2") or Qwen2.5-VL ("2.5"), ViT over 16 px patches."""
    import torch
    import transformers

    torch.manual_seed(0)
    n = len(_vocab())
    prefix = {"2": "Qwen2VL", "2.5": "Qwen2_5_VL"}[version]
    text = {
        **_llama_text(n, {"2": "qwen2_vl_text", "2.5": "qwen2_5_vl_text"}[version]),
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "num_heads": 4,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
    }
    if version == "2":
        vision.update(embed_dim=32, mlp_ratio=2)
    else:
        vision.update(
            intermediate_size=64, out_hidden_size=32, window_size=64, fullatt_block_indexes=[1]
        )
    cfg = getattr(transformers, f"{prefix}Config")(
        text_config=text,
        vision_config=vision,
        image_token_id=n,
        vision_start_token_id=4,  # <image>, </image> of the tiny tokenizer
        vision_end_token_id=5,
    )
    getattr(transformers, f"{prefix}Model")(cfg).save_pretrained(folder)
    save_tokenizer(folder)
    return folder
