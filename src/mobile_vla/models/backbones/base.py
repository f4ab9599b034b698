"""What a VLM adapter provides, and the registry of adapters.

An adapter wraps one VLM family behind a handful of properties and two encode methods
(RoboVLMs' good idea, without its 1,400-line base class):

* ``preprocess(images)``: uint8 frames (N, 3, H, W) -> the model's pixel tensor;
* ``encode_post(pixels, texts, action_embeds)``: one frame per sequence -> (N, n_act, D), the
  hidden states at the action tokens (the "context vector");
* ``encode_pre(pixels, texts, action_embeds, obs_mask)``: the frames of a window interleaved in
  one sequence -> (B, n_act, D);
* ``groups()``: named parameter groups the transfer strategies act on — ``vision``,
  ``resampler`` (projector), ``text_embedding``, ``text`` (a separate text tower, if any),
  ``decoder_layers`` (bottom to top) and ``decoder_other`` (final norms etc.);
* ``lora_targets``: default module-name suffixes LoRA wraps;
* ``set_gradient_checkpointing(on)``.

The learnable action token(s) live in the policy, not the adapter, so every family places
them the same way: at the end of the text, before EOS.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mobile_vla.config import BackboneConfig
from mobile_vla.errors import ConfigError

GROUP_NAMES = ("vision", "resampler", "text_embedding", "text", "decoder_layers", "decoder_other")


class Backbone(nn.Module):
    """Base class of VLM adapters (see the module docstring)."""

    name: str = ""
    hidden_size: int
    image_size: tuple[int, int]
    lora_targets: tuple[str, ...] = ()

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.cfg = cfg

    # -- text ------------------------------------------------------------------------------
    def prompt(self, instruction: str) -> str:
        return self.cfg.prompt.format(instruction=instruction)

    # -- to implement ----------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_post(
        self, pixels: torch.Tensor, texts: Sequence[str], action_embeds: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def encode_pre(
        self,
        pixels: torch.Tensor,
        texts: Sequence[str],
        action_embeds: torch.Tensor,
        obs_mask: torch.Tensor,
    ) -> torch.Tensor:
        raise NotImplementedError

    def groups(self) -> dict[str, list[nn.Module]]:
        raise NotImplementedError

    def lora_scope(self) -> nn.Module:
        """The module LoRA adapters go into (the language model / fusion layers)."""
        raise NotImplementedError

    def max_window(self) -> int:
        """Most frames one ``pre`` sequence can hold."""
        raise NotImplementedError

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        raise NotImplementedError

    #: Width of :meth:`sentence_embedding` (0: the backbone has no sentence encoder).
    sentence_dim: int = 0

    def sentence_embedding(self, texts: Sequence[str]) -> torch.Tensor:
        """One fixed vector per instruction (N, sentence_dim), for strategies whose head reads
        the instruction beside the backbone's output (``frozen_text``)."""
        raise ConfigError(
            f"strategy 'frozen_text' needs a backbone with a sentence encoder; backbone "
            f"'{self.name}' has none (use backbone.name=builtin)"
        )

    #: Parameter-name prefixes whose weights come from the pretrained source (hub or folder):
    #: frozen ones need not be saved with a run, as they are reloaded from there.
    pretrained_prefixes: tuple[str, ...] = ("model.",)


def normalize_pixels(
    images: torch.Tensor, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float (N, 3, h, w): resized (bilinear, antialiased) and
    standardised with the model's mean and std."""
    x = images.float() / 255.0
    if tuple(x.shape[-2:]) != tuple(size):
        x = nn.functional.interpolate(
            x, size=size, mode="bilinear", antialias=True, align_corners=False
        )
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t
