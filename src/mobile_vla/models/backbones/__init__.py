"""VLM adapters, one file per family, chosen by name from :data:`FAMILIES`.

The map is explicit (name -> module and class), and a family's module is imported only when
it is built, so the families import :mod:`.base` and nothing imports them back.
"""

from __future__ import annotations

import difflib
import importlib

from mobile_vla.config import BackboneConfig
from mobile_vla.errors import ConfigError
from mobile_vla.models.backbones.base import Backbone

FAMILIES: dict[str, tuple[str, str]] = {
    "builtin": ("mobile_vla.models.backbones.builtin", "BuiltinBackbone"),
    "kosmos2": ("mobile_vla.models.backbones.kosmos2", "Kosmos2Backbone"),
    "paligemma": ("mobile_vla.models.backbones.paligemma", "PaliGemmaBackbone"),
    "llava": ("mobile_vla.models.backbones.llava", "LlavaBackbone"),
    "idefics3": ("mobile_vla.models.backbones.idefics3", "Idefics3Backbone"),
    "qwen2_vl": ("mobile_vla.models.backbones.qwen2_vl", "Qwen2VLBackbone"),
    "qwen2_5_vl": ("mobile_vla.models.backbones.qwen2_vl", "Qwen25VLBackbone"),
}


def available_backbones() -> list[str]:
    return sorted(FAMILIES)


def backbone_class(name: str) -> type[Backbone]:
    if name not in FAMILIES:
        close = difflib.get_close_matches(name, list(FAMILIES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"config key 'backbone.name' must be one of {sorted(FAMILIES)}, got {name!r}{hint}"
        )
    module, cls = FAMILIES[name]
    return getattr(importlib.import_module(module), cls)


def build_backbone(cfg: BackboneConfig) -> Backbone:
    return backbone_class(cfg.name)(cfg)


__all__ = ["FAMILIES", "Backbone", "available_backbones", "backbone_class", "build_backbone"]
