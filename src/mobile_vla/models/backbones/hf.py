"""Loading Hugging Face models, tokenizers and image statistics by hub id or local folder,
with one clear error when that fails."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mobile_vla.errors import ConfigError


def _why(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def quiet_loading() -> None:
    """No per-tensor "Loading weights" progress bars from ``transformers``."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_pretrained(cls: Any, source: str) -> Any:
    """``cls.from_pretrained(source)`` in train mode (``from_pretrained`` returns eval mode)."""
    quiet_loading()
    try:
        model = cls.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"config key 'backbone.path': cannot load {cls.__name__} from {source!r} ({_why(exc)})"
        ) from None
    model.train()
    return model


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"config key 'backbone.path': cannot load the tokenizer of {source!r} ({_why(exc)})"
        ) from None


def processor_stats(
    source: str, mean: Sequence[float], std: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The image mean/std of the model's image processor, or the family defaults."""
    path = Path(source) / "preprocessor_config.json"
    try:
        if path.is_file():
            conf = json.loads(path.read_text())
        else:
            from transformers import AutoImageProcessor

            conf = AutoImageProcessor.from_pretrained(source).to_dict()
        return tuple(conf["image_mean"]), tuple(conf["image_std"])
    except Exception:
        return tuple(mean), tuple(std)


def set_hf_checkpointing(model: Any, enabled: bool) -> None:
    """Turn a ``transformers`` model's gradient checkpointing on or off."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif model.is_gradient_checkpointing:
        model.gradient_checkpointing_disable()
