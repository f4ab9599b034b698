"""Does a frozen backbone hand the instruction's side to the head? A probe on first frames.

At t = 0 the left and the right scenario of a layout give the same image, so whatever tells
the sides apart must come from the instruction. For paired first frames (one scene, both
instructions) this measures, on held-out scenes:

* per fusion layer, a linear probe of the side from the text tokens' keys and values there
  (mean over the real text tokens): does the side survive the layer?
* a read-out trained as Case 3 trains it: ``n`` learnable action tokens through the frozen
  fusion transformer and a linear classifier on their output: can the frozen backbone's
  action-token output carry the side at all?

    python -m mobile_vla.analysis.instruction_probe [CONFIG] [--key=value ...]

runs both for the config's backbone and prints one table (the built-in backbone: the shipped
weights and, with ``backbone.pretrained=false``, random ones).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mobile_vla.config import DISTANCES, LAYOUTS, Config, load_config


def paired_first_frames(cfg: Config, scenes: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """uint8 (2 * scenes, 3, H, W) first frames and their instructions: each scene twice,
    instructed left then right (the frames are equal)."""
    from mobile_vla.data.frame_cache import resize_frames
    from mobile_vla.sim.env import NavEnv
    from mobile_vla.sim.scenario import make_scenario

    sim = replace(cfg.sim, image_size=list(cfg.data.image_size))
    frames, texts = [], []
    with NavEnv(sim) as env:
        for i in range(scenes):
            cell = (LAYOUTS[i % 2], DISTANCES[i % 3])
            left = make_scenario(seed + i, cell[0], "left", cell[1], sim)
            right = make_scenario(seed + i, cell[0], "right", cell[1], sim)
            image = resize_frames(env.reset(left)["image"][None], cfg.data.image_size)[0]
            frames += [image, image]
            texts += [left.instruction, right.instruction]
    return torch.from_numpy(np.stack(frames).transpose(0, 3, 1, 2)), texts


def _linear_probe(x: torch.Tensor, y: torch.Tensor, train: int, steps: int = 500) -> float:
    x = (x - x[:train].mean(0)) / (x[:train].std(0) + 1e-6)
    lin = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(lin(x[:train])[:, 0], y[:train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((lin(x[train:])[:, 0] > 0).float() == y[train:]).float().mean())


def probe_instruction(
    cfg: Config,
    scenes: int = 160,
    seed: int = 7000,
    readout_tokens: tuple[int, ...] = (1, 4),
    readout_steps: int = 300,
) -> dict[str, Any]:
    """Held-out accuracy (3/4 of the scenes train, 1/4 test) of the probes above; 0.5 is
    chance. Needs a backbone with ``prefix`` / ``encode_from_prefix`` (the built-in one)."""
    from mobile_vla.models.backbones import build_backbone

    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.backbone).eval()
    frames, texts = paired_first_frames(cfg, scenes, seed)
    y = torch.tensor([1.0, 0.0] * scenes)
    train = 2 * (3 * scenes // 4)
    with torch.no_grad():
        kv, mask = backbone.prefix(backbone.preprocess(frames), texts)
    n_img = int(mask.shape[1] - backbone.max_text_tokens)
    text_mask = mask[:, n_img:].float()[..., None]
    layers = []
    for layer in range(kv.shape[1]):
        row = {"layer": layer}
        for name, k in (("keys", 0), ("values", 1)):
            pooled = (kv[:, layer, k, n_img:] * text_mask).sum(1) / text_mask.sum(1)
            row[name] = _linear_probe(pooled, y, train)
        layers.append(row)
    readout = {}
    for n in readout_tokens:
        tokens = torch.nn.Parameter(torch.randn(n, backbone.hidden_size) * 0.02)
        lin = torch.nn.Linear(n * backbone.hidden_size, 1)
        opt = torch.optim.Adam([tokens, *lin.parameters()], lr=3e-3)
        g = torch.Generator().manual_seed(cfg.seed)
        for _ in range(readout_steps):
            idx = torch.randint(0, train, (64,), generator=g)
            out = backbone.encode_from_prefix(kv[idx], mask[idx], tokens).flatten(1)
            loss = F.binary_cross_entropy_with_logits(lin(out)[:, 0], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out = backbone.encode_from_prefix(kv[train:], mask[train:], tokens).flatten(1)
            readout[n] = float(((lin(out)[:, 0] > 0).float() == y[train:]).float().mean())
    return {
        "scenes": scenes,
        "held_out_scenes": scenes - train // 2,
        "layers": layers,
        "readout": readout,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = argv.pop(0) if argv and not argv[0].startswith("--") else "configs/builtin_frozen.yaml"
    cfg = load_config(config, [a.removeprefix("--") for a in argv])
    result = probe_instruction(cfg)
    print(
        f"left/right from paired first frames, backbone {cfg.backbone.name} "
        f"(pretrained={cfg.backbone.pretrained}), {result['held_out_scenes']} held-out scenes"
    )
    for row in result["layers"]:
        print(
            f"  fusion layer {row['layer']}: text keys {row['keys']:.3f}, "
            f"values {row['values']:.3f}"
        )
    for n, acc in result["readout"].items():
        print(f"  trained read-out, {n} action token(s): {acc:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
