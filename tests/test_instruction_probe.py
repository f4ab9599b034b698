"""The instruction probe: swap pairs that differ in the side word alone, layer probes that find
the side where it is, a read-out that passes its positive control (the same read-out on random
weights, where the side reaches the action token) and stays at chance on shuffled labels."""

from __future__ import annotations

import torch

from mobile_vla.analysis.instruction_probe import (
    CONTROL_TARGET,
    _fit_linear,
    format_probe,
    probe_instruction,
    side_token_positions,
    swap_pairs,
)
from mobile_vla.config import load_config
from mobile_vla.models.backbones import build_backbone

from .conftest import TINY_BUILTIN


def test_swap_pairs_differ_in_the_side_word_only() -> None:
    cfg = load_config(None, [*TINY_BUILTIN, "data.image_size=[32,32]"])
    frames, texts = swap_pairs(cfg, 3, seed=1)
    assert frames.shape == (6, 3, 32, 32)
    assert torch.equal(frames[0], frames[1]) and not torch.equal(frames[0], frames[2])
    assert "left" in texts[0] and "right" in texts[1]
    assert texts[0].replace("left", "right") == texts[1]
    backbone = build_backbone(cfg.backbone)
    pos = side_token_positions(backbone, texts)
    ids = backbone.tokenize(texts)["input_ids"]
    assert pos[0] == pos[1] and ids[0, pos[0]] != ids[1, pos[1]]


def test_probe_control_passes_and_shuffled_labels_stay_at_chance() -> None:
    """On the default geometry with random weights the side reaches the action token (every
    text token carries it, attention spreads evenly): the read-out must find it there — the
    positive control — and must not on labels shuffled across scenes."""
    cfg = load_config("configs/builtin_frozen.yaml", ["backbone.pretrained=false"])
    result = probe_instruction(cfg, scenes=96, readout_steps=300, control=False)
    assert result["held_out_scenes"] == 24
    assert result["layers"][0]["side_token"] >= 0.95  # the side word names the side
    assert result["case3_readout"]["held_out"] >= CONTROL_TARGET
    assert result["case3_readout"]["train"] >= CONTROL_TARGET
    assert abs(result["shuffled_labels"]["held_out"] - 0.5) <= 0.2
    lines = format_probe(result, "random weights")
    assert any("Case-3 read-out" in line for line in lines)


def test_linear_fit_reports_train_and_held_out() -> None:
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(200, generator=g) > 0.5).float()
    noise = torch.randn(200, 16, generator=g)
    fit = _fit_linear(noise, y, 150)
    assert abs(fit["held_out"] - 0.5) < 0.2  # no signal: chance on held-out rows
    signal = noise.clone()
    signal[:, 0] += 4 * (2 * y - 1)
    fit = _fit_linear(signal, y, 150)
    assert fit["train"] > 0.95 and fit["held_out"] > 0.95
