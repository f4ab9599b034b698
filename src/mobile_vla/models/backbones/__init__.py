"""VLM adapters, one file per family, registered by name (see :mod:`.base`)."""

from mobile_vla.models.backbones.base import Backbone, available_backbones, build_backbone

__all__ = ["Backbone", "available_backbones", "build_backbone"]
