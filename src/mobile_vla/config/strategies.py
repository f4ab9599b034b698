"""Transfer-learning strategies: each a preset of RoboVLMs' ``train_setup`` flags (what they
mean and how set flags override them: ``models/strategies.py``). The names are written here
only; the study grid and the strategy code read them from this table."""

from __future__ import annotations

from typing import Any

STRATEGY_FLAGS = (
    "train_vision",
    "freeze_resampler",
    "train_text_embedding",
    "train_text_tower",
    "train_decoder_layers",
    "lora_enable",
)
ALL_PARTS_ON = {
    "train_vision": True,
    "freeze_resampler": False,
    "train_text_embedding": True,
    "train_text_tower": True,
    "train_decoder_layers": -1,
}
ALL_PARTS_OFF = {
    "train_vision": False,
    "freeze_resampler": True,
    "train_text_embedding": False,
    "train_text_tower": False,
    "train_decoder_layers": 0,
}
STRATEGY_PRESETS: dict[str, dict[str, Any]] = {
    "frozen": {**ALL_PARTS_OFF, "lora_enable": False},
    "lora": {**ALL_PARTS_OFF, "lora_enable": True},
    "partial": {**ALL_PARTS_OFF, "train_decoder_layers": 2, "lora_enable": False},
    "full": {**ALL_PARTS_ON, "lora_enable": False},
    "sandwich": {
        **ALL_PARTS_OFF,
        "train_vision": True,
        "train_decoder_layers": 1,
        "lora_enable": False,
    },
    "gradual": {**ALL_PARTS_OFF, "lora_enable": False},
    "frozen_text": {**ALL_PARTS_OFF, "lora_enable": False},
}
STRATEGIES = tuple(STRATEGY_PRESETS)
