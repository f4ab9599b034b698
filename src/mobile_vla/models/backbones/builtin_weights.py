"""Reading the built-in backbone's pretrained weights (the model layer's side; the writer,
``export_weights``, and the card's text live in :mod:`mobile_vla.pretraining.weights`).

A weights file is ``NAME.safetensors`` with ``NAME.json`` beside it: the model card as data
(format, architecture, SHA-256 of the tensors file, ...). Loading checks the hash and the
architecture before a single tensor is used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mobile_vla.config import BuiltinConfig
from mobile_vla.errors import ConfigError
from mobile_vla.io import file_sha256

FORMAT = "mobile-vla-builtin-weights"
VERSION = 1
SHIPPED_NAME = "builtin-vl"
# The geometry keys that decide the tensors' shapes (the sentence encoder's width enters
# through text_proj, so the encoder is named too).
ARCH_KEYS = (
    "image_size",
    "patch_size",
    "vision_width",
    "vision_layers",
    "vision_heads",
    "fusion_width",
    "fusion_layers",
    "fusion_heads",
    "text_encoder",
)


class WeightsError(ConfigError):
    pass


def shipped_weights() -> Path:
    return Path(__file__).resolve().parents[2] / "weights" / f"{SHIPPED_NAME}.safetensors"


def architecture(cfg: BuiltinConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in ARCH_KEYS}


def card_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def read_card(weights: Path) -> dict[str, Any]:
    card = card_path(weights)
    if not weights.is_file():
        raise WeightsError(f"weights file '{weights}' does not exist")
    if not card.is_file():
        raise WeightsError(
            f"weights file '{weights}' has no model card '{card.name}' beside it (it holds "
            "the SHA-256 and the architecture the weights are checked against)"
        )
    try:
        data = json.loads(card.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise WeightsError(f"model card '{card}' is not valid JSON") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise WeightsError(f"model card '{card}' is not a {FORMAT} card")
    return data


def load_weights(weights: str | Path, cfg: BuiltinConfig) -> dict[str, torch.Tensor]:
    """The tensors of ``weights``, after checking its SHA-256 and architecture against the
    card and ``cfg``; each problem is one error naming the file."""
    weights = Path(weights)
    card = read_card(weights)
    digest = file_sha256(weights)
    if digest != card.get("sha256"):
        raise WeightsError(
            f"weights file '{weights}' has SHA-256 {digest[:16]}..., its model card says "
            f"{str(card.get('sha256'))[:16]}...: the file was modified or corrupted"
        )
    want = architecture(cfg)
    have = card.get("architecture", {})
    diff = [
        f"{k}: {have.get(k)!r} (config {want[k]!r})" for k in ARCH_KEYS if have.get(k) != want[k]
    ]
    if diff:
        raise WeightsError(
            f"weights file '{weights}' is for another architecture of backbone.builtin: "
            + "; ".join(diff)
            + " (set backbone.pretrained=false to train this geometry from random weights)"
        )
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as exc:  # pragma: no cover - the hash catches this first
        raise WeightsError(f"weights file '{weights}' is unreadable ({exc})") from None
