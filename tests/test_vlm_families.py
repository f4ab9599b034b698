"""The LLaVA, Idefics3 and Qwen2-VL adapters against the real `transformers` code they stand in
for: Qwen2-VL's patches against Qwen's image processor, its M-RoPE positions against
`Qwen2VLModel.get_rope_index`, and the token counts against the models' own feature shapes.
(Training a step, LoRA, partial / full, checkpointing and save / load of every family:
tests/test_policy.py and tests/test_training.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mobile_vla.config import BackboneConfig
from mobile_vla.models.backbones import build_backbone


def adapter(name: str, vlms: dict[str, Path]) -> Any:
    return build_backbone(BackboneConfig(name=name, path=str(vlms[name])))


def test_qwen2_vl_patches_are_those_of_qwens_image_processor(tiny_vlms) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    bb = adapter("qwen2_vl", tiny_vlms)
    side = bb.image_size[0]
    assert side == 224 and bb.num_image_tokens == (224 // 16 // 2) ** 2 == 49
    images = np.random.default_rng(0).integers(0, 256, (2, side, side, 3), dtype=np.uint8)
    proc = Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, temporal_patch_size=2, do_resize=False
    )
    ref = proc(images=list(images), return_tensors="pt")
    ours = bb.patchify(bb.preprocess(torch.from_numpy(images).permute(0, 3, 1, 2)))
    assert ref["image_grid_thw"].tolist() == [[1, 14, 14]] * 2
    torch.testing.assert_close(ours, ref["pixel_values"].float(), atol=1e-5, rtol=1e-5)
    feats = bb.image_features(bb.preprocess(torch.from_numpy(images).permute(0, 3, 1, 2)))
    assert feats.shape == (2, bb.num_image_tokens, bb.hidden_size)


def test_qwen2_vl_positions_are_those_of_get_rope_index(tiny_vlms) -> None:
    from mobile_vla.models.backbones.sequence import pack

    bb = adapter("qwen2_vl", tiny_vlms)
    # the tiny tokenizer's <image> / </image> stand in for <|vision_start|> / <|vision_end|>
    bb.image_open, bb.image_close = [4], [5]
    texts = ["go around the box on the left", "go right"]
    rows = bb._rows(texts, [[False, True], [True, True]], 1)  # a padded history frame
    packed = pack(rows, bb.pad, bb.placeholder)
    ids = packed.input_ids.clone()
    ids[packed.image_mask] = bb.model.config.image_token_id
    grid = torch.tensor([[1, bb.grid, bb.grid]] * 3)
    ref, _ = bb.model.get_rope_index(
        ids, packed.image_mask.int(), image_grid_thw=grid, attention_mask=packed.attention_mask
    )
    ours = bb._positions(rows, packed)
    valid = packed.attention_mask.bool()
    for axis in range(3):
        assert torch.equal(ours[axis][valid], ref[axis][valid]), axis


@pytest.mark.parametrize("name", ["llava", "idefics3"])
def test_image_token_counts_are_the_models_own(name, tiny_vlms) -> None:
    bb = adapter(name, tiny_vlms)
    pixels = bb.preprocess(torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8))
    assert pixels.shape[-2:] == bb.image_size
    feats = bb.image_features(pixels)
    assert feats.shape == (3, bb.num_image_tokens, bb.hidden_size)
    expected = {"llava": (32 // 8) ** 2, "idefics3": (32 // 8) ** 2 // 4}[name]
    assert bb.num_image_tokens == expected
    groups = bb.groups()
    owned = {id(p) for ms in groups.values() for m in ms for p in m.parameters()}
    assert owned == {id(p) for p in bb.model.parameters()}  # every parameter in one group


def test_the_perceiver_resampler_trains_in_every_strategy(tiny_vlms, tmp_path) -> None:
    """Its weights are new: with the backbone frozen it trains beside the head, the language
    model reads num_latents tokens per frame, and the frozen backbone does not move."""
    from .test_policy import make, one_step
    from .test_training import RESAMPLER

    _, policy, plan = make("llava", tiny_vlms, tmp_path, "train_setup.strategy=frozen", *RESAMPLER)
    bb = policy.backbone
    assert bb.num_image_tokens == 4
    pixels = bb.preprocess(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert bb.image_tokens(pixels).shape == (2, 4, bb.hidden_size)
    moved = {n for n, c in one_step(policy, plan).items() if c}
    assert any(n.startswith("backbone.perceiver.") for n in moved)
    assert not any(n.startswith("backbone.model.") for n in moved)
    assert {g["name"] for g in plan.param_groups} >= {"perceiver", "head"}
    assert plan.table["resampler"]["trainable"] == sum(p.numel() for p in bb.perceiver.parameters())
