"""The built-in backbone's vision-language pretrained weights: export and model card (the
reader is :mod:`mobile_vla.models.backbones.builtin_weights`).

A weights file is ``NAME.safetensors`` (every backbone tensor except the sentence encoder's,
which ships in its own package) with ``NAME.json`` beside it: the model card as data (format,
architecture, SHA-256 of the tensors file, corpus, steps, command, metrics). Loading checks
the hash and the architecture before a single tensor is used. The package ships one such pair
(``mobile_vla/weights/builtin-vl.*``) plus a human-readable ``MODEL_CARD.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mobile_vla.config import BuiltinConfig
from mobile_vla.io import atomic_path, atomic_write_json, file_sha256
from mobile_vla.models.backbones.builtin_weights import (  # the reader, beside the model
    ARCH_KEYS,
    FORMAT,
    SHIPPED_NAME,
    VERSION,
    WeightsError,
    architecture,
    card_path,
    load_weights,
    read_card,
    shipped_weights,
)

__all__ = [
    "ARCH_KEYS",
    "FORMAT",
    "SHIPPED_NAME",
    "VERSION",
    "WeightsError",
    "architecture",
    "card_path",
    "export_weights",
    "load_weights",
    "model_card_markdown",
    "read_card",
    "shipped_weights",
]


def export_weights(
    state: dict[str, torch.Tensor], cfg: BuiltinConfig, out: str | Path, card: dict[str, Any]
) -> Path:
    """Write ``out`` (.safetensors) and its card (.json) atomically; returns the tensors path."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise WeightsError(f"weights file '{out}' must end in .safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().float() for k, v in state.items()}
    with atomic_path(out, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    full = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": architecture(cfg),
        "sha256": file_sha256(out),
        "bytes": out.stat().st_size,
        "parameters": int(sum(v.numel() for v in tensors.values())),
        **card,
    }
    atomic_write_json(card_path(out), full)
    return out


# what each pretrain-eval metric scores, and in which phrasing (``_itc`` / ``_itm``: the score)
METRIC_NOTES = {
    "r1": "image -> caption among `candidates`, R@1; held-out caption templates",
    "r5": "the same, R@5",
    "left_right": 'left/right probe, both directions; training phrasing ("X to the left of Y")',
    "left_right_held_out": (
        'the same pairs in a phrasing no training template uses ("left of the Y there is X")'
    ),
    "colour": 'colour of an object among all colours ("an image showing a <colour> <shape>")',
    "shape": "object type among all shapes, the same phrasing",
}
SCORES = {"itc": "contrastive embeddings", "itm": "the fusion transformer's match head"}


COUNTS = {
    "retrieval_images": "held-out images ranked",
    "candidates": "captions ranked per image",
    "probe_scenes": "scenes in the left/right probe",
    "colour_objects": "objects in the colour test",
    "shape_objects": "objects in the object-type test",
    "chance_r1": "R@1 of a random ranking",
    "chance_r5": "R@5 of a random ranking",
}


def _metric_note(key: str) -> str:
    base, _, score = key.rpartition("_")
    if score in SCORES and base in METRIC_NOTES:
        return f"{METRIC_NOTES[base]}; score: {SCORES[score]}"
    return COUNTS.get(key, "")


def _policy_probe_lines(probe: dict[str, Any] | None) -> list[str]:
    """The card's section on what a policy loading the weights receives (the instruction
    probe of :mod:`mobile_vla.analysis.instruction_probe`, with its controls)."""
    if not probe:
        return [
            "",
            "## What a policy receives",
            "",
            "Not probed for these weights (`policy_probe_scenes: 0`); run "
            "`python -m mobile_vla.analysis.instruction_probe --backbone.builtin.weights=FILE`.",
        ]
    if "case3_readout" not in probe:  # a card written before the probe had controls
        return [
            "",
            "## What a policy receives",
            "",
            "Probed without controls; run the probe "
            "again (`python -m mobile_vla.analysis.instruction_probe`).",
        ]
    layers = probe["layers"]
    lines = [
        "",
        f"## What a policy receives (`{probe.get('command', '')}`)",
        "",
        f"Swap pairs of navigation first frames ({probe['scenes']} scenes, "
        f"{probe['held_out_scenes']} held out): one image with an instruction and the same "
        "sentence with left and right swapped, so 0.5 is chance and the side can only come from "
        "the side word. Held-out accuracy of linear probes of the side at each fusion layer:",
        "",
        "| held-out accuracy | " + " | ".join(f"layer {r['layer']}" for r in layers) + " |",
        "|---|" + "---|" * len(layers),
    ]
    for name, label in (
        ("keys", "text keys (mean)"),
        ("values", "text values (mean)"),
        ("side_token", "the side word's token"),
    ):
        cells = [f"{r[name]:.3f}" if name in r else "-" for r in layers]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    r3 = probe["case3_readout"]
    lines += [
        "",
        f"The action token's output moves with the side word by {probe['swap_ratio']:.1%} of "
        "what a change of scene moves it. A Case-3 read-out (a learned action token through "
        "the frozen fusion transformer + a linear classifier on its standardized output): "
        f"train {r3['train']:.3f}, held-out {r3['held_out']:.3f}.",
    ]
    ctrl = probe.get("control")
    if ctrl:
        c = ctrl["readout"]
        lines.append(
            f"Positive control, {ctrl['what']}: train {c['train']:.3f}, held-out "
            f"{c['held_out']:.3f} (target >= {ctrl['target']}: "
            f"{'passed' if ctrl['passed'] else 'FAILED'}); there the output moves by "
            f"{ctrl['swap_ratio']:.1%}."
        )
    if "case4_readout" in probe:
        c = probe["case4_readout"]
        lines.append(
            f"With LoRA in the fusion layers (Case 4): train {c['train']:.3f}, held-out "
            f"{c['held_out']:.3f}."
        )
    return lines


def _objectives(pc: dict[str, Any]) -> list[str]:
    """What the pretraining config trained, in words."""
    objectives = ["image-text contrast (ITC; left/right, colour, shape and count hard negatives)"]
    if pc.get("attribute_weight", 0) > 0:
        objectives.append("grounded attributes (colour and shape per scene cell) from the ViT")
    if pc.get("fusion_weight", 0) > 0:
        objectives.append(
            "the same attributes read through the fusion transformer by a read-out query"
        )
    if pc.get("itm_weight", 0) > 0 and pc.get("itm_images", 0) > 0:
        objectives.append("image-text matching through the fusion transformer (ITM)")
    if pc.get("text_order_layers", 0) > 0:
        objectives.append(
            "a word-order head on the text embedding"
            + (", with a left/right swap loss" if pc.get("order_weight", 0) > 0 else "")
            + (", and a claim loss (which object is left)" if pc.get("claim_weight") else "")
            + (" (trained on the locked backbone)" if pc.get("head_steps", 0) > 0 else "")
        )
    return objectives


def model_card_markdown(card: dict[str, Any]) -> str:
    """The human-readable model card."""
    m = card.get("metrics", {})
    arch = card.get("architecture", {})
    pc = card.get("pretrain_config", {})
    objectives = _objectives(pc)
    lines = [
        "# builtin-vl: vision-language pretrained weights of the built-in backbone",
        "",
        "ViT + fusion transformer of mobile-vla's `builtin` backbone, pretrained against the",
        "frozen all-MiniLM-L6-v2 sentence encoder on a caption corpus rendered with MuJoCo (not",
        "the navigation task), with: " + "; ".join(objectives) + ".",
        "ITC scores are the contrastive embedding's, ITM the fusion transformer's match head's",
        "(absent when it was not trained). Loaded by default by `backbone.name: builtin`;",
        "`backbone.pretrained: false` gives the same architecture from random weights.",
        "",
        "| | |",
        "|---|---|",
        f"| file | `{card.get('file', SHIPPED_NAME + '.safetensors')}` "
        f"({card.get('bytes', 0) / 1e6:.1f} MB, {card.get('parameters', 0):,} parameters, fp32) |",
        f"| SHA-256 | `{card.get('sha256')}` |",
        f"| architecture | {', '.join(f'{k}={v}' for k, v in arch.items() if v != '')} |",
        f"| corpus | {card.get('corpus', {}).get('images')} images "
        f"({card.get('corpus', {}).get('splits')}), seed {card.get('corpus', {}).get('seed')}, "
        f"{card.get('corpus', {}).get('image_size')} px |",
        f"| training | {card.get('steps')} steps, batch {card.get('batch_size')}"
        + (
            f", then {card['head_steps']} steps of the heads on the locked backbone, batch "
            f"{card.get('pretrain_config', {}).get('head_batch_size')}"
            + (" on the images and their mirror images" if pc.get("head_mirror") else "")
            + (", the image embedding reading the cell probe" if pc.get("head_cells") else "")
            + (f" (seed {pc['head_seed']})" if pc.get("head_seed") is not None else "")
            if card.get("head_steps")
            else ""
        )
        + ", "
        f"{card.get('train_seconds', 0) / 60:.1f} min on {card.get('machine', '?')}, "
        f"precision {card.get('precision', '32')} |",
        f"| corpus command | `{card.get('corpus', {}).get('command', '')}` |",
        f"| command | `{card.get('command', '')}` |",
        "",
        "## What a policy loads, and what the figures below score",
        "",
        "A policy that loads these weights receives the ViT, the projections and the fusion",
        "transformer"
        + (
            " as the first phase left them (the second phase trains heads only)."
            if card.get("head_steps")
            else "."
        ),
        "Every ITC figure under *Pretraining metrics* is scored through the contrastive image",
        "and caption embeddings"
        + (" and the second-phase heads" if card.get("head_steps") else "")
        + ", which a policy never loads; *What a policy receives* probes the part it loads.",
        "",
        "## Pretraining metrics (held-out scenes; `mobile-vla pretrain-eval`)",
        "",
        "| metric | value | what it scores |",
        "|---|---|---|",
    ]
    for key, value in m.items():
        if value is None or not isinstance(value, int | float):
            continue
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown} | {_metric_note(key)} |")
    lines += _policy_probe_lines(card.get("policy_probe"))
    lines += [
        "",
        "Regenerate: `make pretrain` (corpus + training + evaluation + export, one command).",
        "",
    ]
    return "\n".join(lines)
