"""The built-in backbone's vision-language pretrained weights: export and model card (the
reader is :mod:`mobile_vla.models.backbones.builtin_weights`).

A weights file is ``NAME.safetensors`` (every backbone tensor except the sentence encoder's,
which ships in its own package) with ``NAME.json`` beside it: the model card as data (format,
architecture, SHA-256 of the tensors file, corpus, steps, command, metrics). Loading checks
the hash and the architecture before a single tensor is used. The package ships one such pair
(``mobile_vla/weights/builtin-vl.*``) plus a human-readable ``MODEL_CARD.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mobile_vla.config import BuiltinConfig
from mobile_vla.io import atomic_path, atomic_write_json, file_sha256
from mobile_vla.models.backbones.builtin_weights import (  # the reader, beside the model
    ARCH_KEYS,
    FORMAT,
    SHIPPED_NAME,
    VERSION,
    WeightsError,
    architecture,
    card_path,
    load_weights,
    read_card,
    shipped_weights,
)

__all__ = [
    "ARCH_KEYS",
    "FORMAT",
    "SHIPPED_NAME",
    "VERSION",
    "WeightsError",
    "architecture",
    "card_path",
    "export_weights",
    "load_weights",
    "model_card_markdown",
    "read_card",
    "shipped_weights",
]


def export_weights(
    state: dict[str, torch.Tensor], cfg: BuiltinConfig, out: str | Path, card: dict[str, Any]
) -> Path:
    """Write ``out`` (.safetensors) and its card (.json) atomically; returns the tensors path."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise WeightsError(f"weights file '{out}' must end in .safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().float() for k, v in state.items()}
    with atomic_path(out, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    full = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": architecture(cfg),
        "sha256": file_sha256(out),
        "bytes": out.stat().st_size,
        "parameters": int(sum(v.numel() for v in tensors.values())),
        **card,
    }
    atomic_write_json(card_path(out), full)
    return out


def model_card_markdown(card: dict[str, Any]) -> str:
    """The human-readable model card."""
    m = card.get("metrics", {})
    arch = card.get("architecture", {})
    pc = card.get("pretrain_config", {})
    objectives = ["image-text contrast (ITC; left/right, colour, shape and count hard negatives)"]
    if pc.get("attribute_weight", 0) > 0:
        objectives.append("grounded attributes (colour and shape per scene cell) from the ViT")
    if pc.get("fusion_weight", 0) > 0:
        objectives.append(
            "the same attributes read through the fusion transformer by a read-out query"
        )
    if pc.get("itm_weight", 0) > 0 and pc.get("itm_images", 0) > 0:
        objectives.append("image-text matching through the fusion transformer (ITM)")
    if pc.get("text_order_layers", 0) > 0:
        objectives.append(
            "a word-order head on the text embedding"
            + (", with a left/right swap loss" if pc.get("order_weight", 0) > 0 else "")
            + (", and a claim loss (which object is left)" if pc.get("claim_weight") else "")
            + (" (trained on the locked backbone)" if pc.get("head_steps", 0) > 0 else "")
        )
    lines = [
        "# builtin-vl: vision-language pretrained weights of the built-in backbone",
        "",
        "ViT + fusion transformer of mobile-vla's `builtin` backbone, pretrained against the",
        "frozen all-MiniLM-L6-v2 sentence encoder on a caption corpus rendered with MuJoCo (not",
        "the navigation task), with: " + "; ".join(objectives) + ".",
        "ITC scores are the contrastive embedding's, ITM the fusion transformer's match head's",
        "(absent when it was not trained). Loaded by default by `backbone.name: builtin`;",
        "`backbone.pretrained: false` gives the same architecture from random weights.",
        "",
        "| | |",
        "|---|---|",
        f"| file | `{card.get('file', SHIPPED_NAME + '.safetensors')}` "
        f"({card.get('bytes', 0) / 1e6:.1f} MB, {card.get('parameters', 0):,} parameters, fp32) |",
        f"| SHA-256 | `{card.get('sha256')}` |",
        f"| architecture | {', '.join(f'{k}={v}' for k, v in arch.items() if v != '')} |",
        f"| corpus | {card.get('corpus', {}).get('images')} images "
        f"({card.get('corpus', {}).get('splits')}), seed {card.get('corpus', {}).get('seed')}, "
        f"{card.get('corpus', {}).get('image_size')} px |",
        f"| training | {card.get('steps')} steps, batch {card.get('batch_size')}"
        + (
            f", then {card['head_steps']} steps of the heads on the locked backbone, batch "
            f"{card.get('pretrain_config', {}).get('head_batch_size')}"
            + (" on the images and their mirror images" if pc.get("head_mirror") else "")
            + (", the image embedding reading the cell probe" if pc.get("head_cells") else "")
            + (f" (seed {pc['head_seed']})" if pc.get("head_seed") is not None else "")
            if card.get("head_steps")
            else ""
        )
        + ", "
        f"{card.get('train_seconds', 0) / 60:.1f} min on {card.get('machine', '?')}, "
        f"precision {card.get('precision', '32')} |",
        f"| corpus command | `{card.get('corpus', {}).get('command', '')}` |",
        f"| command | `{card.get('command', '')}` |",
        "",
        "## Metrics (held-out scenes, held-out phrasings; `mobile-vla pretrain-eval`)",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key, value in m.items():
        if value is None:
            continue
        if isinstance(value, float):
            lines.append(f"| {key} | {value:.3f} |")
        elif isinstance(value, int):
            lines.append(f"| {key} | {value} |")
    lines += [
        "",
        "Regenerate: `make pretrain` (corpus + training + evaluation + export, one command).",
        "",
    ]
    return "\n".join(lines)
