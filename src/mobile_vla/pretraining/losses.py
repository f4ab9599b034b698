"""The pretraining losses: what one step of each phase computes from its batch.

First phase (:func:`step_losses`): image-text contrastive (ITC) over the batch's captions and
their minimally changed negatives, image-text matching (ITM), the word-order and claim heads,
and the cell-attribute probes; a batch is a pure function of (seed, step), so a resumed run
draws the same batches. Second phase (:func:`head_step_losses`): the same heads on ViT tokens
computed once (:func:`image_features`), optionally on mirror images with the captions' sides
swapped (:func:`_mirror`). :func:`_total` weighs the parts into the optimised loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mobile_vla.pretraining.caption_scenes import (
    COLOURS,
    SHAPES,
    Fact,
    has_side,
    mirror_fact,
    mirror_objects,
    true_facts,
)
from mobile_vla.pretraining.config import PretrainConfig
from mobile_vla.pretraining.corpus import Corpus
from mobile_vla.pretraining.model import CELLS, PretrainModel


@dataclass
class TextTable:
    """Sentence-encoder token states of every distinct text, computed once."""

    index: dict[str, int]
    states: torch.Tensor  # (T, L, W) float16
    mask: torch.Tensor  # (T, L) bool

    def rows(self, ids: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.as_tensor(ids, dtype=torch.long)
        mask = self.mask[ids]
        length = int(mask.sum(1).max())
        return self.states[ids, :length].float(), mask[:, :length]


@dataclass
class TrainSet:
    ids: list[int]  # training image indices
    captions: list[list[tuple[int, Fact]]]  # per training image: (text id, fact)
    negatives: list[list[list[tuple[int, Fact]]]]  # per image, per caption: perturbed versions
    swaps: list[list[int | None]]  # per image, per caption: left and right swapped (if false)


def jitter(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Brightness and contrast jitter of uint8 (N, 3, H, W) images (kept uint8)."""
    n = images.shape[0]
    x = images.float()
    b = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.4
    c = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.4
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * c + mean * b).clamp(0, 255).round().to(torch.uint8)


def _captions_of(
    rows: np.ndarray, ts: TrainSet, rng: np.random.Generator
) -> tuple[list[tuple[int, Fact]], list[tuple[int, Fact] | None], list[int | None]]:
    """One caption per batch row, one of its perturbed negatives and its left/right swap."""
    chosen, negative, swapped = [], [], []
    for r in rows:
        k = int(rng.integers(len(ts.captions[r])))
        chosen.append(ts.captions[r][k])
        swapped.append(ts.swaps[r][k])
        opts = ts.negatives[r][k]
        negative.append(opts[int(rng.integers(len(opts)))] if opts else None)
    return chosen, negative, swapped


def contrastive_losses(
    model: PretrainModel,
    cfg: PretrainConfig,
    img_emb: torch.Tensor,
    objects: list[list[dict]],
    chosen: list[tuple[int, Fact]],
    negative: list[tuple[int, Fact] | None],
    swapped: list[int | None],
    table: TextTable,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ITC over the batch's captions and their perturbed versions, and (while the word-order
    head is active) the left/right and claim losses; also the similarity matrix, the
    positives and the caption states, for ITM."""
    # text columns: the batch's captions, then their perturbed versions
    columns: list[tuple[int, Fact]] = list(chosen) + [n for n in negative if n is not None]
    text_ids = [c[0] for c in columns]
    b = len(chosen)
    keys = [f for _, f in columns]
    truth = [true_facts(objs) for objs in objects]
    positive = torch.tensor([[k in t for k in keys] for t in truth], dtype=torch.bool)
    states, mask = table.rows(text_ids)
    txt_emb = model.text_embedding(states, mask)
    sim = img_emb @ txt_emb.T * model.scale()  # (B, columns)
    neg_inf = torch.finfo(sim.dtype).min
    i2t = torch.logsumexp(sim, 1) - torch.logsumexp(sim.masked_fill(~positive, neg_inf), 1)
    caps = sim[:, :b]
    t2i = torch.logsumexp(caps, 0) - torch.logsumexp(caps.masked_fill(~positive[:, :b], neg_inf), 0)
    out = {"itc": (i2t.mean() + t2i.mean()) / 2}
    # "X left of Y" captions against themselves with left and right swapped: only word order
    # and the image tell them apart (a single object's side is a word, which the mean state
    # already tells apart)
    sided = [i for i, t in enumerate(swapped) if t is not None and chosen[i][1].kind == "pair"]
    if cfg.order_weight > 0 and model.order_active and sided:
        s_states, s_mask = table.rows([swapped[i] for i in sided])  # type: ignore[misc]
        swap_emb = model.text_embedding(s_states, s_mask)
        rows_t = torch.tensor(sided)
        true = (img_emb[rows_t] * txt_emb[rows_t]).sum(-1)
        false = (img_emb[rows_t] * swap_emb).sum(-1)
        logits = torch.stack([true, false], 1) * model.scale()
        out["order"] = F.cross_entropy(logits, torch.zeros(len(sided), dtype=torch.long))
        with torch.no_grad():
            out["order_acc"] = (true > false).float().mean()
    pairs = [i for i, (_, f) in enumerate(chosen) if f.kind == "pair"]
    if cfg.claim_weight > 0 and model.claim_head is not None and model.order_active and pairs:
        out["claim"] = model.claim_loss(states[pairs], mask[pairs], [chosen[i][1] for i in pairs])
    return out, {"sim": sim, "positive": positive, "states": states, "mask": mask}


def step_losses(
    model: PretrainModel,
    cfg: PretrainConfig,
    corpus: Corpus,
    images: torch.Tensor,
    ts: TrainSet,
    table: TextTable,
    step: int,
) -> dict[str, torch.Tensor]:
    """The losses of training step ``step``; its batch is a pure function of (seed, step)."""
    rng = np.random.default_rng([cfg.seed, 5, step])
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    rows = rng.choice(len(ts.ids), size=min(cfg.batch_size, len(ts.ids)), replace=False)
    objects = [corpus.records[ts.ids[r]]["objects"] for r in rows]
    chosen, negative, swapped = _captions_of(rows, ts, rng)
    b = len(rows)
    batch = images[[ts.ids[r] for r in rows]].permute(0, 3, 1, 2)
    if cfg.augment:
        batch = jitter(batch, gen)
    vit = model.vit(model.backbone.preprocess(batch))
    img_emb = model.image_embedding(vit)
    out, extra = contrastive_losses(model, cfg, img_emb, objects, chosen, negative, swapped, table)
    sim, positive, mask = extra["sim"], extra["positive"], extra["mask"]
    if cfg.attribute_weight > 0:
        logits = model.cell_probe(vit)
        # x 10: the per-label BCE is small (most labels are absent) next to the InfoNCE terms
        out["attr"] = 10 * F.binary_cross_entropy_with_logits(logits, cell_targets(objects))
    if cfg.fusion_weight > 0 and cfg.fusion_images:
        f = cfg.fusion_images
        logits = model.fusion_cells(model.fusion_image_tokens(vit[:f]))
        target = cell_targets(objects[:f])
        out["fusion_attr"] = 10 * F.binary_cross_entropy_with_logits(logits, target)
    k = cfg.itm_images
    if k and cfg.itm_weight > 0:
        txt_tok = model.text_tokens(extra["states"], mask)
        pairs: list[tuple[int, int, float]] = []  # (image row, text column, label)
        neg_col = b
        with torch.no_grad():
            hard = torch.softmax(sim.detach().float(), 1).masked_fill(positive, 0.0)
        for i in range(b):
            has_neg = negative[i] is not None
            if i < k:
                pairs.append((i, i, 1.0))
                if has_neg:
                    pairs.append((i, neg_col, 0.0))
                weights = hard[i]
                if float(weights.sum()) > 0:
                    j = int(torch.multinomial(weights, 1, generator=gen))
                    pairs.append((i, j, 0.0))
                # and an easy one: any other image's caption that is false here, so the match
                # head has something it can learn before it can tell minimal changes apart
                easy = (~positive[i, :b]).float()
                if float(easy.sum()) > 0:
                    pairs.append((i, int(torch.multinomial(easy, 1, generator=gen)), 0.0))
            neg_col += has_neg
        img_rows = torch.tensor([p[0] for p in pairs])
        txt_rows = torch.tensor([p[1] for p in pairs])
        labels = torch.tensor([p[2] for p in pairs])
        img_tok = model.fusion_image_tokens(vit[img_rows])
        logits = model.match_logits(img_tok, txt_tok[txt_rows], mask[txt_rows])
        out["itm"] = F.binary_cross_entropy_with_logits(logits, labels)
        with torch.no_grad():
            out["itm_acc"] = ((logits > 0).float() == labels).float().mean()
    out["loss"] = _total(out, cfg)
    return out


def _total(out: dict[str, torch.Tensor], cfg: PretrainConfig) -> torch.Tensor:
    zero = torch.zeros(())
    return (
        out["itc"]
        + cfg.itm_weight * out.get("itm", zero)
        + cfg.attribute_weight * out.get("attr", zero)
        + cfg.fusion_weight * out.get("fusion_attr", zero)
        + cfg.order_weight * out.get("order", zero)
        + cfg.claim_weight * out.get("claim", zero)
    )


@torch.no_grad()
def image_features(
    model: PretrainModel,
    images: torch.Tensor,
    ids: list[int],
    precision: str,
    tokens: bool,
    mirror: bool = False,
) -> torch.Tensor:
    """For the second phase, unaugmented: the ViT tokens (N, P, W) in bfloat16 when the image
    side's heads train, else the contrastive embeddings (N, D); of the mirror images (left
    and right swapped) with ``mirror``."""
    was = model.training
    model.eval()
    out = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        for _, vit in model.vit_batches(images, ids, 128, mirror):
            out.append(vit.to(torch.bfloat16) if tokens else model.image_embedding(vit).float())
    model.train(was)
    return torch.cat(out)


def _mirror(
    chosen: list[tuple[int, Fact]],
    negative: list[tuple[int, Fact] | None],
    swapped: list[int | None],
    objects: list[list[dict]],
    flip: np.ndarray,
) -> tuple[
    list[tuple[int, Fact]], list[tuple[int, Fact] | None], list[int | None], list[list[dict]]
]:
    """The batch with the ``flip`` rows shown as their mirror image. A side caption becomes
    its swap (true of the mirror), with the caption itself as the perturbed negative and as
    the order loss's false caption; a caption without a side (a count, a single object, the
    centre) and its negative read the same in the mirror."""
    chosen, negative, swapped = list(chosen), list(negative), list(swapped)
    objects = list(objects)
    for i in np.flatnonzero(flip):
        text_id, fact = chosen[i]
        objects[i] = mirror_objects(objects[i])
        if has_side(fact):
            assert swapped[i] is not None
            chosen[i] = (swapped[i], mirror_fact(fact))  # type: ignore[assignment]
            negative[i] = (text_id, fact)
            swapped[i] = text_id
    return chosen, negative, swapped, objects


def image_side_trains(cfg: PretrainConfig) -> bool:
    return cfg.head_cells or any(m in ("image_pool", "image_head") for m in cfg.head_modules)


def head_step_losses(
    model: PretrainModel,
    cfg: PretrainConfig,
    corpus: Corpus,
    features: torch.Tensor,
    ts: TrainSet,
    table: TextTable,
    step: int,
    mirrored: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The losses of a second-phase step (``features``: :func:`image_features` of every
    training image, in the order of ``ts.ids``; ``mirrored``: those of their mirror images,
    for ``head_mirror``); its batch is a pure function of (head_seed or seed, step)."""
    seed = cfg.seed if cfg.head_seed is None else cfg.head_seed
    rng = np.random.default_rng([seed, 6, step])
    rows = rng.choice(len(ts.ids), size=min(cfg.head_batch_size, len(ts.ids)), replace=False)
    objects = [corpus.records[ts.ids[r]]["objects"] for r in rows]
    chosen, negative, swapped = _captions_of(rows, ts, rng)
    picked = features[torch.as_tensor(rows)]
    if mirrored is not None:
        flip = rng.random(len(rows)) < 0.5
        # a side caption whose swap is true as well (a red box on each side) has no mirror
        # text prepared: that row stays as it is
        flip &= [
            not has_side(f) or s is not None for (_, f), s in zip(chosen, swapped, strict=True)
        ]
        chosen, negative, swapped, objects = _mirror(chosen, negative, swapped, objects, flip)
        at = torch.as_tensor(np.flatnonzero(flip))
        picked[at] = mirrored[torch.as_tensor(rows)[at]]
    img_emb = model.image_embedding(picked.float()) if image_side_trains(cfg) else picked
    out, _ = contrastive_losses(model, cfg, img_emb, objects, chosen, negative, swapped, table)
    out["loss"] = _total(out, cfg)
    return out


def cell_targets(objects: list[list[dict]]) -> torch.Tensor:
    """(B, cells, colours + shapes) presence of each colour and shape in each scene cell."""
    target = torch.zeros(len(objects), len(CELLS), len(COLOURS) + len(SHAPES))
    for b, objs in enumerate(objects):
        for o in objs:
            c = CELLS.index((o["lateral"], o["depth"]))
            target[b, c, list(COLOURS).index(o["colour"])] = 1.0
            target[b, c, len(COLOURS) + SHAPES.index(o["shape"])] = 1.0
    return target
