"""``mobile-vla pretrain-eval``: what the pretrained backbone knows, on held-out scenes.

Everything is measured on the corpus's held-out images; retrieval uses the held-out caption
templates (phrasings never trained on), the left/right probe a training phrasing and, beside
it, one no template uses; every distractor is checked against the image's objects, so no
"wrong" candidate is in fact true of the image. These figures score the contrastive
embeddings and heads, which a policy never loads; :func:`policy_probe` probes what it does.
Two scores rank captions:

* ``itc``: cosine of the pooled image embedding and the caption embedding (fast, a
  CLIP-style zero-shot score);
* ``itm``: the fusion transformer's match logit (the path the policy's action tokens read).

Metrics, each for both scores:

* retrieval: image -> caption among ``candidates`` (32: the image's caption and 31 false
  ones from other held-out images); R@1 and R@5 (chance 1/32 and 5/32; ties are broken at
  random, so a constant score gets chance);
* left/right probe: for scenes with two objects side by side (X left of Y, each the only one
  of its colour and shape in the scene, so the false caption is false), is "X to the left of
  Y" ranked above
  "X to the right of Y", and "Y to the right of X" above "Y to the left of X" — the fraction
  of the two directions right (chance 0.5; a score that only prefers one of the words "left"
  and "right" gets exactly 0.5); and the same two objects in a phrasing no training template
  uses ("left of the Y there is X" above "left of the X there is Y", and the mirror), whose
  true and false captions hold the same words (a tie counts 1/2);
* colour and object-type accuracy: "an image showing a <colour> <shape>" over all colours
  (shape fixed, for objects whose shape is unique in the scene), and over all shapes (colour
  fixed, colour unique in the scene) — the true one must rank first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mobile_vla.config import BuiltinConfig
from mobile_vla.pretraining.caption_scenes import (
    COLOURS,
    SHAPES,
    article,
    fact_holds,
    left_right_probe,
    left_right_probe_held_out,
)
from mobile_vla.pretraining.config import PretrainConfig
from mobile_vla.pretraining.corpus import Corpus
from mobile_vla.pretraining.model import PretrainModel

CANDIDATES = 32


def retrieval_sets(
    corpus: Corpus, seed: int, limit: int | None = None, candidates: int = CANDIDATES
) -> list[tuple[int, list[str]]]:
    """Per held-out image: (image index, [true caption, false caption, ...])."""
    rng = np.random.default_rng([seed, 2718])
    val = corpus.split("val")
    if limit is not None and len(val) > limit:
        val = sorted(rng.choice(val, size=limit, replace=False).tolist())
    pool = [
        (t, f)
        for i in corpus.split("val")
        for t, f in zip(
            corpus.records[i]["eval_captions"], corpus.records[i]["eval_facts"], strict=True
        )
    ]
    sets = []
    for i in val:
        r = corpus.records[i]
        k = int(rng.integers(len(r["eval_captions"])))
        true = r["eval_captions"][k]
        chosen: list[str] = [true]
        for j in rng.permutation(len(pool)):
            t, f = pool[j]
            if t not in chosen and not fact_holds(f, r["objects"]):
                chosen.append(t)
            if len(chosen) == candidates:
                break
        if len(chosen) == candidates:
            sets.append((i, chosen))
    return sets


class Scorer:
    """ITC and ITM scores of (image, caption) pairs, with per-image and per-text caches."""

    def __init__(self, model: PretrainModel, corpus: Corpus) -> None:
        self.model, self.corpus = model, corpus
        self._img: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._txt: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def images(self, ids: list[int]) -> None:
        todo = [i for i in ids if i not in self._img]
        for chunk, vit in self.model.vit_batches(self.corpus.images, todo, 64):
            emb = self.model.image_embedding(vit)
            tok = self.model.fusion_image_tokens(vit)
            for k, i in enumerate(chunk):
                self._img[i] = (tok[k], emb[k])

    @torch.no_grad()
    def texts(self, texts: list[str]) -> None:
        todo = sorted({t for t in texts if t not in self._txt})
        backbone = self.model.backbone
        for s in range(0, len(todo), 256):
            chunk = todo[s : s + 256]
            batch = backbone.tokenizer(
                chunk,
                padding=True,
                truncation=True,
                max_length=backbone.max_text_tokens,
                return_tensors="pt",
            )
            states = backbone.text_encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].bool()
            tok = self.model.text_tokens(states, mask)
            emb = self.model.text_embedding(states, mask)
            for k, t in enumerate(chunk):
                n = int(mask[k].sum())
                self._txt[t] = (tok[k, :n], mask[k, :n], emb[k])

    @torch.no_grad()
    def itc(self, image: int, texts: list[str]) -> np.ndarray:
        self.images([image])
        self.texts(texts)
        emb = torch.stack([self._txt[t][2] for t in texts])
        return (emb @ self._img[image][1]).numpy()

    @torch.no_grad()
    def itm(self, image: int, texts: list[str]) -> np.ndarray:
        self.images([image])
        self.texts(texts)
        length = max(self._txt[t][0].shape[0] for t in texts)
        d = self._img[image][0].shape[-1]
        tok = torch.zeros(len(texts), length, d)
        mask = torch.zeros(len(texts), length, dtype=torch.bool)
        for k, t in enumerate(texts):
            n = self._txt[t][0].shape[0]
            tok[k, :n], mask[k, :n] = self._txt[t][0], self._txt[t][1]
        img = self._img[image][0].unsqueeze(0).expand(len(texts), -1, -1)
        return self.model.match_logits(img, tok, mask).numpy()


def _wins(true: float, false: float) -> float:
    """1 when the true caption scores higher, 0 when lower, 1/2 on a tie (a score blind to
    word order ties the held-out probe's pairs, which hold the same words)."""
    return 1.0 if true > false else 0.5 if true == false else 0.0


def hit_probability(scores: np.ndarray, k: int = 1) -> float:
    """Probability that the true caption (``scores[0]``) ranks in the top ``k`` when ties are
    broken at random: with ``g`` candidates scoring higher and ``t`` others tying it, the true
    one lands uniformly on ranks g..g+t. Ties count as the left/right probe counts them (a
    two-way tie is 1/2), never in the true caption's favour: a constant scorer gets 1/n."""
    g = int((scores > scores[0]).sum())
    t = int((scores == scores[0]).sum()) - 1
    return float(min(1.0, max(0.0, (k - g) / (t + 1))))


@torch.no_grad()
def quick_recall(model: PretrainModel, corpus: Corpus, cfg: PretrainConfig) -> float:
    """Held-out ITC R@1 on ``eval_images`` images (the periodic check during training)."""
    model.eval()
    scorer = Scorer(model, corpus)
    sets = retrieval_sets(corpus, cfg.seed, cfg.eval_images)
    scorer.images([i for i, _ in sets])
    return float(np.mean([hit_probability(scorer.itc(i, c)) for i, c in sets]))


@torch.no_grad()
def evaluate(
    model: PretrainModel,
    corpus: Corpus,
    cfg: PretrainConfig,
    limit: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    model.eval()
    scorer = Scorer(model, corpus)
    sets = retrieval_sets(corpus, cfg.seed, limit)
    # the match head is scored only when it was trained (untrained, it is noise and slow:
    # every candidate runs through the fusion transformer)
    scores = {"itc": scorer.itc}
    if cfg.itm_weight > 0 and cfg.itm_images > 0:
        scores["itm"] = scorer.itm
    hits: dict[str, list[tuple[float, float]]] = {"itc": [], "itm": []}  # (top-1, top-5)
    scorer.images([i for i, _ in sets])
    for i, cands in tqdm(sets, desc="retrieval", disable=not progress):
        for name, fn in scores.items():
            s = fn(i, cands)
            hits[name].append((hit_probability(s, 1), hit_probability(s, 5)))
    val = corpus.split("val") if limit is None else [i for i, _ in sets]
    probe: dict[str, list[float]] = {"itc": [], "itm": []}
    probe_held_out: dict[str, list[float]] = {"itc": [], "itm": []}
    colour: dict[str, list[float]] = {"itc": [], "itm": []}
    shape: dict[str, list[float]] = {"itc": [], "itm": []}
    for i in tqdm(val, desc="probes", disable=not progress):
        r = corpus.records[i]
        objs = r["objects"]
        # from the objects, not the corpus's stored pairs: one rule for every corpus version
        pairs_of = (
            (left_right_probe(objs), probe),
            (left_right_probe_held_out(objs), probe_held_out),
        )
        for pairs, into in pairs_of:
            for pair in pairs or ():
                for name, fn in scores.items():
                    s = fn(i, list(pair))
                    into[name].append(_wins(s[0], s[1]))
        for o in objs:
            if sum(p["shape"] == o["shape"] for p in objs) == 1:
                colours = [o["colour"]] + [c for c in COLOURS if c != o["colour"]]
                texts = [f"an image showing {article(c)} {o['shape']}" for c in colours]
                for name, fn in scores.items():
                    colour[name].append(hit_probability(fn(i, texts)))
            if sum(p["colour"] == o["colour"] for p in objs) == 1:
                shapes = [o["shape"]] + [s for s in SHAPES if s != o["shape"]]
                texts = [f"an image showing {article(o['colour'])} {s}" for s in shapes]
                for name, fn in scores.items():
                    shape[name].append(hit_probability(fn(i, texts)))
    summary: dict[str, Any] = {}
    for name in ("itc", "itm"):
        if name not in scores:
            for key in ("r1", "r5", "left_right", "left_right_held_out", "colour", "shape"):
                summary[f"{key}_{name}"] = None  # not trained (itm_weight 0)
            continue
        hk = np.array(hits[name]).reshape(-1, 2)
        summary[f"r1_{name}"] = float(hk[:, 0].mean()) if len(hk) else float("nan")
        summary[f"r5_{name}"] = float(hk[:, 1].mean()) if len(hk) else float("nan")
        for key, values in (
            ("left_right", probe[name]),
            ("left_right_held_out", probe_held_out[name]),
        ):
            summary[f"{key}_{name}"] = float(np.mean(values)) if values else float("nan")
        summary[f"colour_{name}"] = float(np.mean(colour[name])) if colour[name] else float("nan")
        summary[f"shape_{name}"] = float(np.mean(shape[name])) if shape[name] else float("nan")
    summary.update(
        retrieval_images=len(sets),
        candidates=CANDIDATES,
        probe_scenes=len(probe["itc"]) // 2,
        colour_objects=len(colour["itc"]),
        shape_objects=len(shape["itc"]),
        chance_r1=1 / CANDIDATES,
        chance_r5=5 / CANDIDATES,
    )
    return {"summary": summary}


def policy_probe(weights: Path, geometry: BuiltinConfig, scenes: int = 160) -> dict[str, Any]:
    """What a policy loading ``weights`` receives (the ViT, projections and fusion
    transformer; none of the heads that score the ITC figures): the instruction probe of
    :mod:`mobile_vla.analysis.instruction_probe` on paired navigation first frames — does
    the instruction's side survive each fusion layer, and can a Case-3 read-out (action
    tokens through the frozen fusion transformer) carry it? 0.5 is chance."""
    from dataclasses import fields, replace

    from mobile_vla.analysis.instruction_probe import probe_instruction
    from mobile_vla.config import Config

    size = [geometry.image_size, geometry.image_size]
    cfg = Config()
    cfg.backbone = replace(
        cfg.backbone,
        name="builtin",
        pretrained=True,
        builtin=replace(geometry, weights=str(weights)),
    )
    cfg.data = replace(cfg.data, image_size=size)
    cfg.sim = replace(cfg.sim, image_size=size)
    result = probe_instruction(cfg, scenes=scenes)
    # the same probe from the command line (its default config, configs/builtin_frozen.yaml,
    # has the same simulator and seed as the defaults used here)
    default = BuiltinConfig()
    keys = [
        f"--backbone.builtin.{f.name}={getattr(geometry, f.name)}"
        for f in fields(BuiltinConfig)
        if f.name != "weights" and getattr(geometry, f.name) != getattr(default, f.name)
    ]
    result["command"] = " ".join(
        [
            "python -m mobile_vla.analysis.instruction_probe",
            *keys,
            f"--backbone.builtin.weights={weights}",
            f"--data.image_size=[{size[0]},{size[1]}]",
        ]
    )
    return result
