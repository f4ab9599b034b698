"""The configuration of vision-language pretraining (``mobile-vla pretrain``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mobile_vla.config.schema import BuiltinConfig, bad_value

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
                raise bad_value(key, ">= 1", getattr(self, key))
        if self.policy_probe_scenes and self.policy_probe_scenes < 4:
            raise bad_value("policy_probe_scenes", "0 (no probe) or >= 4", self.policy_probe_scenes)
        for key in ("warmup_steps", "eval_every", "itm_images", "fusion_images", "head_steps"):
            if getattr(self, key) < 0:
                raise bad_value(key, ">= 0", getattr(self, key))
        for key in ("itm_images", "fusion_images"):
            if getattr(self, key) > self.batch_size:
                raise bad_value(key, f"<= batch_size ({self.batch_size})", getattr(self, key))
        for key in ("learning_rate", "head_learning_rate"):
            if getattr(self, key) <= 0:
                raise bad_value(key, "> 0", getattr(self, key))
        if self.head_batch_size < 2:
            raise bad_value("head_batch_size", ">= 2", self.head_batch_size)
        for i, name in enumerate(self.head_modules):
            if name not in HEAD_MODULES:
                raise bad_value(f"head_modules[{i}]", f"one of {', '.join(HEAD_MODULES)}", name)
        if self.head_cells and not self.head_steps:
            raise bad_value("head_cells", "false when head_steps is 0 (a second-phase key)", True)
        if self.head_steps and not self.head_modules:
            raise bad_value("head_modules", "at least one module when head_steps > 0", [])
        if not 0 < self.temperature <= 1:
            raise bad_value("temperature", "in (0, 1]", self.temperature)
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
                raise bad_value(key, ">= 0", getattr(self, key))
        if self.claim_weight > 0 and self.text_order_layers == 0:
            raise bad_value("claim_weight", "0 when text_order_layers is 0", self.claim_weight)
        width = self.text_order_width or self.backbone.fusion_width
        if self.text_order_layers and width % self.backbone.fusion_heads:
            raise bad_value(
                "text_order_width",
                f"a multiple of backbone.fusion_heads ({self.backbone.fusion_heads})",
                width,
            )
        if not 0.0 <= self.min_lr_scale <= 1.0:
            raise bad_value("min_lr_scale", "in [0, 1]", self.min_lr_scale)
