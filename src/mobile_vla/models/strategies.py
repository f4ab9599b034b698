"""Transfer-learning strategies: what trains, at which learning rate.

A strategy is a preset of RoboVLMs' ``train_setup`` flags; flags set explicitly in the config
override the preset (``freeze_backbone: true`` first turns every backbone part off, then the
part flags turn parts back on)::

    preset     vision  resampler  text emb  text tower  decoder layers  LoRA
    frozen     -       -          -         -           none            -
    lora       -       -          -         -           none            yes
    partial    -       -          -         -           last 2          -
    full       yes     yes        yes       yes         all             -
    sandwich   yes     -          -         -           last 1          -
    gradual    starts as frozen; unfreezes from the top, one group per epoch
               (or every ``gradual_every_steps`` steps): top layer + final norm, the next
               layers down, then resampler, vision, text embedding + text tower
    frozen_text  frozen, and the head also reads the instruction's sentence embedding
               (another path for the instruction than the backbone's action-token output,
               so it is reported beside Case 3 and Case 4, never as either)

The head and the action token always train. Learning rates: head ``learning_rate``, action
token ``action_token_lr``, LoRA ``lora_lr``, vision ``vision_lr``, other backbone parts
``backbone_lr``, decoder layer k from the top ``backbone_lr * layer_lr_decay**k``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from mobile_vla.config import (
    ALL_PARTS_OFF,
    ALL_PARTS_ON,
    STRATEGY_FLAGS,
    STRATEGY_PRESETS,
    TrainSetup,
)
from mobile_vla.errors import ConfigError

# The presets live beside TrainSetup in config (the one place the strategy names are written).
FLAGS = STRATEGY_FLAGS
PRESETS = STRATEGY_PRESETS
#: Strategies whose head reads the instruction's sentence embedding beside the context vectors.
INSTRUCTION_TO_HEAD = ("frozen_text",)
TABLE_GROUPS = (
    "vision",
    "resampler",
    "text_embedding",
    "text",
    "decoder_layers",
    "decoder_other",
    "lora",
    "action_token",
    "head",
)


@dataclass
class Resolved:
    train_vision: bool
    freeze_resampler: bool
    train_text_embedding: bool
    train_text_tower: bool
    train_decoder_layers: int
    lora_enable: bool
    instruction_to_head: bool = False


def resolve(setup: TrainSetup) -> Resolved:
    flags = dict(PRESETS[setup.strategy])
    flags["instruction_to_head"] = setup.strategy in INSTRUCTION_TO_HEAD
    if setup.freeze_backbone is not None:
        flags.update(ALL_PARTS_OFF if setup.freeze_backbone else ALL_PARTS_ON)
    for name in FLAGS:
        value = getattr(setup, name)
        if value is not None:
            flags[name] = value
    return Resolved(**flags)


@dataclass
class StrategyPlan:
    param_groups: list[dict[str, Any]]
    table: dict[str, dict[str, int]]
    resolved: Resolved
    gradual_stages: list[list[nn.Module]] = field(default_factory=list)
    stage: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "resolved": asdict(self.resolved),
            "params": self.table,
            "groups": [
                {"name": g["name"], "lr": g["lr"], "tensors": len(g["params"])}
                for g in self.param_groups
            ],
        }

    def unfreeze_next(self) -> bool:
        """gradual: make the next stage trainable; False when everything is already."""
        if self.stage >= len(self.gradual_stages):
            return False
        for module in self.gradual_stages[self.stage]:
            module.requires_grad_(True)
        self.stage += 1
        return True


def _lora_targets(scope: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the linear layers in ``scope`` that the target suffixes match; a target
    that matches nothing is an error."""
    names = [n for n, m in scope.named_modules() if isinstance(m, nn.Linear)]
    matched: list[str] = []
    for target in targets:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        if not hits:
            examples = sorted({n.rsplit(".", 1)[-1] for n in names})[:12]
            raise ConfigError(
                f"config key 'train_setup.lora_target_modules': '{target}' matches no linear "
                f"layer of the backbone's language model (names there include {examples})"
            )
        matched += hits
    return sorted(set(matched))


def apply_lora(
    scope: nn.Module,
    setup: TrainSetup,
    default_targets: tuple[str, ...],
    within: list[nn.Module] | None = None,
) -> int:
    """Inject LoRA adapters (PEFT) into ``scope`` (only into linear layers inside the modules
    ``within``, when given); returns how many layers were wrapped."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = _lora_targets(scope, list(setup.lora_target_modules or default_targets))
    if within is not None:
        inside = {id(m) for layer in within for m in layer.modules()}
        targets = [t for t in targets if id(scope.get_submodule(t)) in inside]
        if not targets:
            raise ConfigError(
                "config key 'train_setup.lora_layers': no LoRA target lies in the top "
                f"{setup.lora_layers} decoder layer(s)"
            )
    pattern = "^(" + "|".join(re.escape(t) for t in targets) + ")$"
    config = LoraConfig(
        r=setup.lora_r,
        lora_alpha=setup.lora_alpha,
        lora_dropout=setup.lora_dropout,
        bias=setup.lora_bias,
        target_modules=pattern,
    )
    inject_adapter_in_model(config, scope)
    return len(targets)


def _params(modules: list[nn.Module]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        for p in m.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def apply_strategy(policy: nn.Module, setup: TrainSetup) -> StrategyPlan:
    """Set ``requires_grad`` per the strategy, inject LoRA, and build the optimizer's groups."""
    backbone = policy.backbone
    r = resolve(setup)
    lora = _inject_lora(backbone, setup) if r.lora_enable else []
    groups = backbone.groups()
    _set_trainable(policy, groups, r, lora)
    backbone.set_gradient_checkpointing(setup.gradient_checkpointing)
    stages = _gradual_stages(groups) if setup.strategy == "gradual" else []
    param_groups = _optimizer_groups(policy, setup, groups, lora, stages)
    return StrategyPlan(param_groups, param_table(policy), r, stages)


def _inject_lora(backbone: nn.Module, setup: TrainSetup) -> list[nn.Parameter]:
    """LoRA in the backbone's scope (every decoder layer, or the top ``lora_layers``): the
    adapter matrices and the biases PEFT marked trainable (``lora_bias`` all / lora_only)."""
    within = None
    if setup.lora_layers:
        layers = backbone.groups()["decoder_layers"]
        if setup.lora_layers > len(layers):
            raise ConfigError(
                f"config key 'train_setup.lora_layers' is {setup.lora_layers}, but the "
                f"backbone has {len(layers)} decoder layers"
            )
        within = layers[-setup.lora_layers :]
    apply_lora(backbone.lora_scope(), setup, backbone.lora_targets, within)
    if setup.lora_fused:
        from mobile_vla.models import lora_fused

        lora_fused.enable(backbone.lora_scope())
    lora = [p for n, p in backbone.named_parameters() if "lora_" in n]
    lora_ids = {id(p) for p in lora}
    bias = [
        p
        for n, p in backbone.lora_scope().named_parameters()
        if p.requires_grad
        and id(p) not in lora_ids
        and n.endswith("bias")
        and setup.lora_bias != "none"
    ]
    return lora + bias


def _set_trainable(
    policy: nn.Module, groups: dict[str, list[nn.Module]], r: Resolved, lora: list[nn.Parameter]
) -> None:
    """Freeze the backbone, then unfreeze what the strategy trains; the head, the action
    token and the LoRA parameters always train."""
    layers = groups["decoder_layers"]
    n_layers = len(layers)
    n_train = n_layers if r.train_decoder_layers == -1 else min(r.train_decoder_layers, n_layers)
    policy.backbone.requires_grad_(False)
    on: list[nn.Module] = []
    if r.train_vision:
        on += groups["vision"]
    if not r.freeze_resampler:
        on += groups["resampler"]
    if r.train_text_embedding:
        on += groups["text_embedding"]
    if r.train_text_tower:
        on += groups["text"]
    if n_train > 0:
        on += layers[n_layers - n_train :] + groups["decoder_other"]
    for m in on:
        m.requires_grad_(True)
    for p in lora:
        p.requires_grad_(True)
    policy.head.requires_grad_(True)
    policy.action_token.requires_grad_(True)
    for m in _new_modules(policy.backbone):
        m.requires_grad_(True)


def _new_modules(backbone: nn.Module) -> list[nn.Module]:
    """Modules the backbone adds to the pretrained model (the perceiver resampler): they start
    from random weights, so they train whatever the strategy, like the head."""
    perceiver = getattr(backbone, "perceiver", None)
    return [perceiver] if perceiver is not None else []


def _gradual_stages(groups: dict[str, list[nn.Module]]) -> list[list[nn.Module]]:
    """What gradual unfreezing adds at each stage: the top decoder layer (with the decoder's
    other parts), each lower layer in turn, the resampler, the vision tower, the text side."""
    layers = groups["decoder_layers"]
    top = [layers[-1], *groups["decoder_other"]] if layers else groups["decoder_other"]
    stages = [top] + [[m] for m in reversed(layers[:-1])]
    stages += [groups["resampler"], groups["vision"], groups["text_embedding"] + groups["text"]]
    return [s for s in stages if _params(s)]


def _optimizer_groups(
    policy: nn.Module,
    setup: TrainSetup,
    groups: dict[str, list[nn.Module]],
    lora: list[nn.Parameter],
    stages: list[list[nn.Module]],
) -> list[dict[str, Any]]:
    """Optimizer groups, each at its learning rate (per-layer decay below the top decoder
    layer), for everything trainable now and what gradual will unfreeze later; no weight
    decay on biases, norms, embeddings and the action token."""
    optimizable = {id(p) for p in policy.parameters() if p.requires_grad}
    for s in stages:
        optimizable |= {id(p) for p in _params(s)}
    layers = groups["decoder_layers"]
    base = setup.backbone_lr
    spec: list[tuple[str, list[nn.Parameter], float]] = [
        ("head", list(policy.head.parameters()), setup.learning_rate),
        ("action_token", [policy.action_token], setup.action_token_lr or setup.learning_rate),
        ("lora", lora, setup.lora_lr),
        ("perceiver", _params(_new_modules(policy.backbone)), setup.learning_rate),
        (
            "vision",
            _params(groups["vision"]),
            setup.vision_lr if setup.vision_lr is not None else base,
        ),
        ("resampler", _params(groups["resampler"]), base),
        ("text_embedding", _params(groups["text_embedding"]), base),
        ("text", _params(groups["text"]), base),
        ("decoder_other", _params(groups["decoder_other"]), base),
    ]
    for k, layer in enumerate(reversed(layers)):
        spec.append(
            (
                f"decoder_layer_{len(layers) - 1 - k}",
                _params([layer]),
                base * setup.layer_lr_decay**k,
            )
        )
    param_groups: list[dict[str, Any]] = []
    taken: set[int] = set()
    for name, params, lr in spec:
        chosen = [p for p in params if id(p) in optimizable and id(p) not in taken]
        taken |= {id(p) for p in chosen}
        embedding = name in ("action_token", "text_embedding")
        decay = [p for p in chosen if p.ndim >= 2 and not embedding]
        no_decay = [p for p in chosen if p.ndim < 2 or embedding]
        for suffix, ps, wd in (("", decay, None), ("_no_decay", no_decay, 0.0)):
            if ps:
                group: dict[str, Any] = {"name": name + suffix, "params": ps, "lr": lr}
                if wd is not None:
                    group["weight_decay"] = wd
                param_groups.append(group)
    return param_groups


def param_table(policy: nn.Module) -> dict[str, dict[str, int]]:
    """Trainable / total parameter counts per group (LoRA counted on its own)."""
    backbone = policy.backbone
    groups = backbone.groups()
    rows: dict[str, list[nn.Parameter]] = {g: [] for g in TABLE_GROUPS}
    seen: set[int] = set()

    def add(name: str, params: list[nn.Parameter]) -> None:
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                rows[name].append(p)

    add("lora", [p for n, p in backbone.named_parameters() if "lora_" in n])
    add("resampler", _params(_new_modules(backbone)))  # the perceiver, beside the projector
    for g in ("vision", "resampler", "text_embedding", "text", "decoder_layers", "decoder_other"):
        add(g, _params(groups[g]))
    add("action_token", [policy.action_token])
    add("head", list(policy.head.parameters()))
    other = [p for p in policy.parameters() if id(p) not in seen]
    table = {
        g: {
            "trainable": sum(p.numel() for p in ps if p.requires_grad),
            "total": sum(p.numel() for p in ps),
        }
        for g, ps in rows.items()
    }
    table["other_backbone"] = {
        "trainable": sum(p.numel() for p in other if p.requires_grad),
        "total": sum(p.numel() for p in other),
    }
    table["all"] = {
        "trainable": sum(p.numel() for p in policy.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in policy.parameters()),
    }
    return table


def format_table(table: dict[str, dict[str, int]]) -> str:
    lines = [f"{'group':<16} {'trainable':>14} {'total':>14} {'share':>7}"]
    for name, row in table.items():
        share = row["trainable"] / row["total"] if row["total"] else 0.0
        lines.append(f"{name:<16} {row['trainable']:>14,} {row['total']:>14,} {share:>7.1%}")
    return "\n".join(lines)
