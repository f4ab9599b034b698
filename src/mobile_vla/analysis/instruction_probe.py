"""Does the instruction's side reach the action head? A probe on first frames, with controls.

At t = 0 the left and the right scenario of a layout give the same image, so whatever tells
the sides apart must come from the instruction. The probe takes one first frame per scene
twice, with the instruction and with only its side word swapped (``swap pairs``: the same
template, so nothing but the side word differs), and measures on held-out scenes (3/4 of the
scenes train, 1/4 test; 0.5 is chance; training accuracy beside held-out accuracy):

* **where the side is**, per fusion layer: a linear probe of the side from the text tokens'
  keys and values (mean over the real text tokens) and from the side word's own token;
* **how far the action-token path moves with it**: the distance between the action-token
  output for an instruction and for its swap, as a share of the distance between two scenes
  (the same instruction): what the head has to separate the sides by;
* **read-outs trained as the strategies train**: learnable action token(s) through the fusion
  transformer and a linear classifier on their (standardized) output — frozen (Case 3), and
  with LoRA adapters in the fusion layers (Case 4, ``lora=True``);
* **a positive control**: the same read-out code on the same architecture with random
  weights, whose every text token carries the side at every layer and whose attention spreads
  evenly, so the side reaches the action token: the read-out must find it there (>= 0.95);
* **a negative control**: the same read-out with the labels shuffled across scenes must stay
  at chance on held-out scenes.

    python -m mobile_vla.analysis.instruction_probe [CONFIG] [--lora] [--key=value ...]

prints one table (the built-in backbone; the config's weights, and the random-weight control).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mobile_vla.config import DISTANCES, LAYOUTS, Config, load_config
from mobile_vla.data.hdf5 import swap_left_right

#: what the positive control must reach on held-out scenes
CONTROL_TARGET = 0.95


def paired_first_frames(cfg: Config, scenes: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """uint8 (2 * scenes, 3, H, W) first frames and their instructions: each scene twice,
    instructed left then right (the frames are equal; the two instructions are the scenario's
    own, so their templates may differ)."""
    from mobile_vla.data.images import resize_frames
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


def swap_pairs(cfg: Config, scenes: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """As :func:`paired_first_frames`, but the second instruction of a scene is the first with
    left and right swapped: the pair differs in the side word alone."""
    frames, texts = paired_first_frames(cfg, scenes, seed)
    left = texts[0::2]
    return frames, [t for text in left for t in (text, swap_left_right(text))]


def _standardize(x: torch.Tensor, train: int) -> torch.Tensor:
    return (x - x[:train].mean(0)) / (x[:train].std(0) + 1e-6)


def _accuracy(logits: torch.Tensor, y: torch.Tensor, train: int) -> dict[str, float]:
    right = ((logits > 0).float() == y).float()
    return {"train": float(right[:train].mean()), "held_out": float(right[train:].mean())}


def _linear_probe(x: torch.Tensor, y: torch.Tensor, train: int, steps: int = 500) -> float:
    """Held-out accuracy of a logistic regression on standardized features."""
    return _fit_linear(x, y, train, steps)["held_out"]


def _fit_linear(x: torch.Tensor, y: torch.Tensor, train: int, steps: int = 500) -> dict[str, float]:
    """Train and held-out accuracy of a logistic regression on standardized features
    (the first ``train`` rows train)."""
    x = _standardize(x.detach().float(), train)
    lin = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.binary_cross_entropy_with_logits(lin(x[:train])[:, 0], y[:train])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return _accuracy(lin(x)[:, 0], y, train)


def side_token_positions(backbone: Any, texts: list[str]) -> torch.Tensor:
    """Index of each text's side word (``left`` / ``right``) among its text tokens."""
    ids = backbone.tokenize(texts)["input_ids"]
    side = set(backbone.tokenizer.convert_tokens_to_ids(["left", "right"]))
    out = []
    for text, row in zip(texts, ids.tolist(), strict=True):
        hits = [i for i, t in enumerate(row) if t in side]
        if not hits:
            raise ValueError(f"no side word among the tokens of {text!r}")
        out.append(hits[0])
    return torch.tensor(out)


def layer_probes(
    backbone: Any, pixels: torch.Tensor, texts: list[str], y: torch.Tensor, train: int
) -> list[dict[str, Any]]:
    """Per fusion layer (the states entering it; the last row is the fusion output): linear
    probes of the side from the text tokens' keys and values (mean over real text tokens) and
    from the side word's own token state."""
    n_img = backbone.vision.num_patches
    pos = torch.arange(len(texts))
    side = n_img + side_token_positions(backbone, texts)
    with torch.no_grad():
        states, mask = backbone.prefix_states(pixels, texts)
    text_mask = mask[:, n_img:].float()[..., None]
    rows = []
    for layer, x in enumerate(states):
        row: dict[str, Any] = {"layer": layer}
        if layer < len(backbone.fusion):
            kv = backbone.fusion[layer].prefix_kv(x)
            for name, k in (("keys", 0), ("values", 1)):
                pooled = (kv[k][:, n_img:] * text_mask).sum(1) / text_mask.sum(1)
                row[name] = _linear_probe(pooled, y, train)
        row["side_token"] = _linear_probe(x[pos, side], y, train)
        rows.append(row)
    return rows


def swap_ratio(backbone: Any, kv: torch.Tensor, mask: torch.Tensor, seed: int = 0) -> float:
    """Mean distance between the action-token output of an instruction and of its swap (rows
    2i, 2i+1), over the mean distance between consecutive scenes' outputs (same side): how
    much of what moves the context vector the side accounts for, through the frozen path and
    a freshly initialised action token."""
    g = torch.Generator().manual_seed(seed)
    token = torch.randn(1, backbone.hidden_size, generator=g) * 0.02
    with torch.no_grad():
        out = backbone.encode_from_prefix(kv, mask, token)[:, 0]
    side = (out[0::2] - out[1::2]).norm(dim=1).mean()
    left = out[0::2]
    scene = (left[1:] - left[:-1]).norm(dim=1).mean()
    return float(side / scene)


def train_readout(
    backbone: Any,
    kv: torch.Tensor,
    mask: torch.Tensor,
    hidden: torch.Tensor | None,
    y: torch.Tensor,
    train: int,
    tokens: int = 1,
    steps: int = 400,
    extra: list[torch.nn.Parameter] | None = None,
    extra_lr: float = 1e-3,
    seed: int = 0,
) -> dict[str, float]:
    """Train ``tokens`` action tokens (and ``extra`` parameters, e.g. LoRA) with a linear
    classifier on their standardized output, on the first ``train`` rows of the cached
    prefix (``kv``, ``mask``, ``hidden`` as :meth:`prefix_split` gives them); train and
    held-out accuracy. The standardization (batch statistics in training, the training rows'
    statistics at evaluation) puts the classifier on the scale of what varies between inputs,
    not of the output's constant part."""
    g = torch.Generator().manual_seed(seed)
    act = torch.nn.Parameter(torch.randn(tokens, backbone.hidden_size, generator=g) * 0.02)
    lin = torch.nn.Linear(tokens * backbone.hidden_size, 1)
    groups = [{"params": [act], "lr": 3e-3}, {"params": list(lin.parameters()), "lr": 1e-2}]
    if extra:
        groups.append({"params": extra, "lr": extra_lr})
    opt = torch.optim.Adam(groups)

    def encode(index: torch.Tensor) -> torch.Tensor:
        h = None if hidden is None else hidden[index]
        return backbone.encode_from_prefix(kv[index], mask[index], act, h).flatten(1)

    batch = min(32, train)
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, train, (batch,), generator=g)
            out = encode(idx)
            out = (out - out.mean(0)) / (out.std(0) + 1e-6)
            loss = F.binary_cross_entropy_with_logits(lin(out)[:, 0], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        out = torch.cat(
            [encode(torch.arange(s, min(s + 64, len(kv)))) for s in range(0, len(kv), 64)]
        )
        return _accuracy(lin(_standardize(out, train))[:, 0], y, train)


def _setting(
    cfg: Config,
    frames: torch.Tensor,
    texts: list[str],
    y: torch.Tensor,
    train: int,
    tokens: int,
    steps: int,
    lora: bool,
    lora_steps: int,
) -> dict[str, Any]:
    """Every measurement of the probe for one backbone setting."""
    from mobile_vla.data.normalization import ActionStats
    from mobile_vla.training.runs import build_policy

    stats = ActionStats.from_arrays(["linear_x"], [np.zeros((2, 1), np.float32)])
    frozen_cfg = replace(cfg, train_setup=replace(cfg.train_setup, strategy="frozen"))
    torch.manual_seed(cfg.seed)
    policy, _ = build_policy(frozen_cfg, stats)
    backbone = policy.backbone.eval()
    pixels = backbone.preprocess(frames)
    with torch.no_grad():
        kv, mask = backbone.prefix(pixels, texts)
    result: dict[str, Any] = {
        "layers": layer_probes(backbone, pixels, texts, y, train),
        "swap_ratio": swap_ratio(backbone, kv, mask, cfg.seed),
        "case3_readout": train_readout(backbone, kv, mask, None, y, train, tokens, steps),
    }
    shuffled = y.clone()
    g = torch.Generator().manual_seed(cfg.seed)
    shuffled[: train // 2 * 2] = _shuffle_scenes(y[: train // 2 * 2], g)
    result["shuffled_labels"] = train_readout(
        backbone, kv, mask, None, shuffled, train, tokens, steps
    )
    if lora:
        lora_cfg = replace(
            cfg, train_setup=replace(cfg.train_setup, strategy="lora", lora_dropout=0.0)
        )
        torch.manual_seed(cfg.seed)
        policy, _ = build_policy(lora_cfg, stats)
        backbone = policy.backbone.eval()
        split = backbone.trainable_split()
        with torch.no_grad():
            kv, hidden, mask = backbone.prefix_split(backbone.preprocess(frames), texts, split)
        adapters = [p for n, p in backbone.named_parameters() if p.requires_grad]
        result["case4_readout"] = train_readout(
            backbone,
            kv,
            mask,
            hidden,
            y,
            train,
            tokens,
            lora_steps,
            adapters,
            cfg.train_setup.lora_lr,
        )
        result["case4_lora"] = {
            "r": cfg.train_setup.lora_r,
            "alpha": cfg.train_setup.lora_alpha,
            "lr": cfg.train_setup.lora_lr,
            "layers": cfg.train_setup.lora_layers or len(backbone.fusion),
            "steps": lora_steps,
        }
    return result


def _shuffle_scenes(y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Labels with each scene's pair kept or flipped at random: no relation to the side left."""
    flip = torch.randint(0, 2, (len(y) // 2,), generator=g).bool()
    pairs = y.view(-1, 2).clone()
    pairs[flip] = pairs[flip].flip(1)
    return pairs.flatten()


def probe_instruction(
    cfg: Config,
    scenes: int = 160,
    seed: int = 7000,
    readout_tokens: int = 1,
    readout_steps: int = 400,
    lora: bool = False,
    lora_steps: int = 600,
    control: bool = True,
) -> dict[str, Any]:
    """Every measurement of the module docstring, for the config's backbone and (``control``)
    for the same architecture with random weights. Needs a backbone with a cacheable prefix
    (the built-in one)."""
    frames, texts = swap_pairs(cfg, scenes, seed)
    y = torch.tensor([1.0, 0.0] * scenes)
    train = 2 * (3 * scenes // 4)
    args = (frames, texts, y, train, readout_tokens, readout_steps)
    result: dict[str, Any] = {
        "scenes": scenes,
        "held_out_scenes": scenes - train // 2,
        "pairs": "swap: one first frame per scene, the instruction and its side word swapped",
        "readout_tokens": readout_tokens,
        "readout_steps": readout_steps,
        **_setting(cfg, *args, lora, lora_steps),
    }
    if control:
        random_cfg = replace(cfg, backbone=replace(cfg.backbone, pretrained=False))
        ctrl = _setting(random_cfg, *args, False, lora_steps)
        result["control"] = {
            "what": "the same read-out on the same architecture with random weights",
            "target": CONTROL_TARGET,
            "readout": ctrl["case3_readout"],
            "passed": ctrl["case3_readout"]["held_out"] >= CONTROL_TARGET,
            "layers": ctrl["layers"],
            "swap_ratio": ctrl["swap_ratio"],
        }
    return result


def format_probe(result: dict[str, Any], title: str) -> list[str]:
    """The probe as printed lines."""
    lines = [
        f"{title}: {result['held_out_scenes']} held-out scenes of {result['scenes']}, swap pairs "
        "(0.5 = chance; train / held-out accuracy for read-outs)"
    ]
    for row in result["layers"]:
        text = ", ".join(f"{k} {row[k]:.3f}" for k in ("keys", "values", "side_token") if k in row)
        lines.append(f"  entering fusion layer {row['layer']}: {text}")
    lines.append(f"  action-token output: |swap| / |scene change| = {result['swap_ratio']:.4f}")
    for key, name in (
        ("case3_readout", "Case-3 read-out (frozen)"),
        ("case4_readout", "Case-4 read-out (LoRA)"),
        ("shuffled_labels", "negative control (labels shuffled)"),
    ):
        if key in result:
            r = result[key]
            lines.append(f"  {name}: train {r['train']:.3f}, held-out {r['held_out']:.3f}")
    ctrl = result.get("control")
    if ctrl:
        r = ctrl["readout"]
        verdict = "passed" if ctrl["passed"] else "FAILED"
        lines.append(
            f"  positive control ({ctrl['what']}): train {r['train']:.3f}, held-out "
            f"{r['held_out']:.3f} (target >= {ctrl['target']}: {verdict}); "
            f"|swap| / |scene change| = {ctrl['swap_ratio']:.4f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    lora = "--lora" in argv
    argv = [a for a in argv if a != "--lora"]
    config = argv.pop(0) if argv and not argv[0].startswith("--") else "configs/builtin_lora.yaml"
    cfg = load_config(config, [a.removeprefix("--") for a in argv])
    result = probe_instruction(cfg, lora=lora)
    title = f"backbone {cfg.backbone.name} (pretrained={cfg.backbone.pretrained})"
    print("\n".join(format_probe(result, title)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
