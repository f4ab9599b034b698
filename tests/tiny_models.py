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
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 8,
        },
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
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 8,
            "projection_dim": 32,
        },
        image_token_index=n,
        projection_dim=32,
        hidden_size=32,
    )
    PaliGemmaModel(cfg).save_pretrained(folder)
    save_tokenizer(folder)
    return folder
