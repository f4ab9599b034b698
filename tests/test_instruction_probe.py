"""The instruction probe: it finds the side in the text tokens where it is, and a read-out
through a frozen fusion transformer is measured on held-out scenes."""

from __future__ import annotations

import torch

from mobile_vla.analysis.instruction_probe import (
    _linear_probe,
    paired_first_frames,
    probe_instruction,
)
from mobile_vla.config import load_config

from .conftest import TINY_BUILTIN


def test_paired_first_frames_differ_only_in_the_instruction() -> None:
    cfg = load_config(None, [*TINY_BUILTIN, "data.image_size=[32,32]"])
    frames, texts = paired_first_frames(cfg, 3, seed=1)
    assert frames.shape == (6, 3, 32, 32)
    assert torch.equal(frames[0], frames[1]) and not torch.equal(frames[0], frames[2])
    assert "left" in texts[0] and "right" in texts[1]


def test_probe_reads_the_side_where_it_is_and_not_where_it_is_not() -> None:
    cfg = load_config(None, [*TINY_BUILTIN, "data.image_size=[32,32]"])
    result = probe_instruction(cfg, scenes=24, readout_tokens=(2,), readout_steps=30)
    assert result["held_out_scenes"] == 6 and len(result["layers"]) == 3
    # the sentence encoder's tokens name the side: linearly decodable at the first layer
    assert result["layers"][0]["keys"] >= 0.9 and result["layers"][0]["values"] >= 0.9
    assert 0.0 <= result["readout"][2] <= 1.0
    # the probe itself is at chance on features that carry no side
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(200, 16, generator=g)
    labels = (torch.rand(200, generator=g) > 0.5).float()
    assert abs(_linear_probe(noise, labels, 150) - 0.5) < 0.2
