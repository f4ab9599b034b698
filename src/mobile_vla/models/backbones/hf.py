"""Loading Hugging Face models, tokenizers and image statistics by hub id or local folder,
with one clear error when that fails."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mobile_vla.config import BackboneConfig
from mobile_vla.errors import ConfigError
from mobile_vla.models.backbones.base import Backbone, normalize_pixels
from mobile_vla.models.backbones.resampler import PerceiverResampler


def _why(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def quiet_loading() -> None:
    """No per-tensor "Loading weights" progress bars from ``transformers``."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_pretrained(cls: Any, source: str, pretrained: bool = True) -> Any:
    """``cls.from_pretrained(source)`` in train mode (``from_pretrained`` returns eval mode);
    with ``pretrained=False`` the same architecture from its config, randomly initialised."""
    quiet_loading()
    try:
        if not pretrained:
            from transformers import AutoConfig

            try:
                return cls._from_config(AutoConfig.from_pretrained(source)).train()
            except (AttributeError, TypeError, KeyError) as exc:
                raise ConfigError(
                    f"config key 'backbone.path': {source!r} does not configure a "
                    f"{cls.__name__} ({_why(exc)})"
                ) from None
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


class HFBackbone(Backbone):
    """Shared part of the adapters of ``transformers`` VLMs: loading the model and tokenizer
    (or taking them as given, e.g. a model built on the meta device to count parameters),
    the image statistics, preprocessing and gradient checkpointing. A subclass sets the
    class attributes below and reads its geometry in :meth:`_geometry`, its special token ids
    in :meth:`_token_ids`."""

    model_class: str = ""  # name of the transformers class
    default_id: str = ""
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __init__(self, cfg: BackboneConfig, model: Any = None, tokenizer: Any = None) -> None:
        super().__init__(cfg)
        import transformers

        source = cfg.path or self.default_id
        cls = getattr(transformers, self.model_class)
        self.model = model if model is not None else load_pretrained(cls, source, cfg.pretrained)
        if not cfg.pretrained:
            self.pretrained_prefixes = ()  # random weights cannot be reloaded: save them all
        self.tokenizer = tokenizer
        if tokenizer is None and model is None:
            self.tokenizer = load_tokenizer(source)
        self.mean, self.std = (
            processor_stats(source, self.image_mean, self.image_std)
            if model is None
            else (self.image_mean, self.image_std)
        )
        self._geometry(self.model.config)
        self.perceiver: PerceiverResampler | None = None
        r = cfg.resampler
        if r.enabled:  # the language model then reads num_latents tokens per frame
            self.perceiver = PerceiverResampler(
                self.hidden_size, r.depth, r.dim_head, r.heads, r.num_latents
            )
            self.num_image_tokens = r.num_latents
        if self.tokenizer is not None:
            self._token_ids()

    def _geometry(self, conf: Any) -> None:
        raise NotImplementedError

    def _token_ids(self) -> None:
        raise NotImplementedError

    def _rows(self, texts: Sequence[str], frames: list[list[bool]], n_act: int) -> list:
        """One :func:`~mobile_vla.models.backbones.sequence.pack` row per text, with one image
        span per entry of ``frames`` (False: a padded history frame, masked)."""
        raise NotImplementedError

    def _run(
        self, rows: list, image_features: torch.Tensor, action_embeds: torch.Tensor
    ) -> torch.Tensor:
        """The language model over the packed rows -> action-token states (N, n_act, D)."""
        raise NotImplementedError

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixels).pooler_output

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, tokens, D): the family's image features, through the perceiver if there is one."""
        features = self.image_features(pixels)
        return features if self.perceiver is None else self.perceiver(features)

    def encode_post(
        self, pixels: torch.Tensor, texts: Sequence[str], action_embeds: torch.Tensor
    ) -> torch.Tensor:
        rows = self._rows(texts, [[True]] * len(texts), action_embeds.shape[0])
        return self._run(rows, self.image_tokens(pixels), action_embeds)

    def encode_pre(
        self,
        pixels: torch.Tensor,
        texts: Sequence[str],
        action_embeds: torch.Tensor,
        obs_mask: torch.Tensor,
    ) -> torch.Tensor:
        rows = self._rows(texts, obs_mask.bool().tolist(), action_embeds.shape[0])
        return self._run(rows, self.image_tokens(pixels.flatten(0, 1)), action_embeds)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        set_hf_checkpointing(self.model, enabled)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_pixels(images, self.image_size, self.mean, self.std)
