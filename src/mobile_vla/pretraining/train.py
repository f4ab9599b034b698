"""``mobile-vla pretrain``: vision-language pretraining of the built-in backbone.

A run folder::

    config.yaml              the resolved PretrainConfig
    checkpoints/last/        model + optimizer + step (safetensors + JSON), every
                             ``checkpoint_every`` steps and at the end; ``--resume`` continues
                             from it, bit for bit (batches and augmentation are a function of
                             (seed, step))
    checkpoints/phase1/      the same at the end of the first phase (with ``head_steps``)
    log.csv                  step, losses, learning rate, temperature, periodic held-out R@1
    metrics.json             ``mobile-vla pretrain-eval`` (also run at the end of training)
    export/                  builtin-vl.safetensors + .json card + MODEL_CARD.md

The sentence encoder is frozen, so its token states are computed once per distinct caption
(and per minimally changed caption used as a negative) before training.

Two phases: ``steps`` train the whole model (backbone and heads); then ``head_steps`` train
only the heads of ``head_modules`` on the locked backbone (the word-order head, its claim
head, the image pooling and map), from ViT tokens computed once, with larger batches, and
with ``head_mirror`` on the images and their mirror images (sides swapped in the captions to
match), with ``head_cells`` an image embedding that also reads the cell probe. The backbone the
policy reads is the first phase's.
"""

from __future__ import annotations

import csv
import math
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mobile_vla.config import PretrainConfig, load_config, save_config, to_dict
from mobile_vla.errors import MobileVLAError
from mobile_vla.hardware import resolve_precision
from mobile_vla.io import atomic_write_json, atomic_write_text
from mobile_vla.pretraining.caption_scenes import (
    COLOURS,
    SHAPES,
    fact_key,
    has_side,
    mirror_fact,
    mirror_objects,
    perturb,
    swap_sides,
    true_facts,
)
from mobile_vla.pretraining.corpus import Corpus, load_corpus
from mobile_vla.pretraining.model import CELLS, PretrainModel
from mobile_vla.training.checkpoint import load_folder, save_folder
from mobile_vla.training.module import warmup_cosine

PERTURBATIONS = 4  # minimally changed captions prepared per training caption


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


@torch.no_grad()
def encode_texts(
    model: PretrainModel, texts: list[str], progress: bool = False, batch: int = 512
) -> TextTable:
    backbone = model.backbone
    unique = sorted(set(texts))
    width = backbone.text_encoder.config.hidden_size
    limit = backbone.max_text_tokens
    states = torch.zeros(len(unique), limit, width, dtype=torch.float16)
    mask = torch.zeros(len(unique), limit, dtype=torch.bool)
    bar = tqdm(total=len(unique), desc="encode captions", unit="text", disable=not progress)
    for start in range(0, len(unique), batch):
        chunk = unique[start : start + batch]
        tok = backbone.tokenizer(
            chunk, padding=True, truncation=True, max_length=limit, return_tensors="pt"
        )
        out = backbone.text_encoder(**tok).last_hidden_state
        n = out.shape[1]
        states[start : start + len(chunk), :n] = out.half()
        mask[start : start + len(chunk), :n] = tok["attention_mask"].bool()
        bar.update(len(chunk))
    bar.close()
    return TextTable({t: i for i, t in enumerate(unique)}, states, mask)


@dataclass
class TrainSet:
    ids: list[int]  # training image indices
    captions: list[list[tuple[int, dict]]]  # per training image: (text id, fact)
    negatives: list[list[list[tuple[int, dict]]]]  # per image, per caption: perturbed versions
    swaps: list[list[int | None]]  # per image, per caption: left and right swapped (if false)


def prepare(corpus: Corpus, seed: int) -> tuple[TrainSet, list[str]]:
    """Training captions and their perturbed negatives (only those false for the image)."""
    rng = np.random.default_rng([seed, 31337])
    ids = corpus.split("train")
    texts: list[str] = []
    caps, negs, swaps = [], [], []
    for i in ids:
        r = corpus.records[i]
        per_image, per_neg, per_swap = [], [], []
        truth = true_facts(r["objects"])
        for text, fact in zip(r["captions"], r["facts"], strict=True):
            texts.append(text)
            per_image.append((text, fact))
            swapped = swap_sides(text, fact)
            if swapped is not None and fact_key(swapped[1]) in truth:
                swapped = None  # e.g. a red box on each side: both captions are true
            per_swap.append(swapped[0] if swapped else None)
            texts.extend([swapped[0]] if swapped else [])
            options = []
            for _ in range(PERTURBATIONS):
                p = perturb(text, fact, rng)
                if p is not None and fact_key(p[1]) not in truth and p not in options:
                    options.append(p)
            texts.extend(t for t, _ in options)
            per_neg.append(options)
        caps.append(per_image)
        negs.append(per_neg)
        swaps.append(per_swap)
    return TrainSet(ids, caps, negs, swaps), texts  # type: ignore[arg-type]


def _index(ts: TrainSet, table: TextTable) -> TrainSet:
    return TrainSet(
        ts.ids,
        [[(table.index[t], f) for t, f in per] for per in ts.captions],
        [[[(table.index[t], f) for t, f in opts] for opts in per] for per in ts.negatives],
        [[None if t is None else table.index[t] for t in per] for per in ts.swaps],  # type: ignore[index]
    )


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
) -> tuple[list[tuple[int, dict]], list[tuple[int, dict] | None], list[int | None]]:
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
    chosen: list[tuple[int, dict]],
    negative: list[tuple[int, dict] | None],
    swapped: list[int | None],
    table: TextTable,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ITC over the batch's captions and their perturbed versions, and (while the word-order
    head is active) the left/right and claim losses; also the similarity matrix, the
    positives and the caption states, for ITM."""
    # text columns: the batch's captions, then their perturbed versions
    columns: list[tuple[int, dict]] = list(chosen) + [n for n in negative if n is not None]
    text_ids = [c[0] for c in columns]
    b = len(chosen)
    keys = [fact_key(f) for _, f in columns]
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
    sided = [i for i, t in enumerate(swapped) if t is not None and chosen[i][1]["k"] == "pair"]
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
    pairs = [i for i, (_, f) in enumerate(chosen) if f["k"] == "pair"]
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


def head_params(model: PretrainModel, cfg: PretrainConfig) -> list[tuple[str, nn.Parameter]]:
    """What the second phase trains: the parameters of ``cfg.head_modules``."""
    modules = [*cfg.head_modules, *(["cell_map"] if model.cell_map is not None else [])]
    names = tuple(m if m == "log_scale" else f"{m}." for m in modules)
    return [(n, p) for n, p in model.trainable() if n.startswith(names)]


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
    chosen: list[tuple[int, dict]],
    negative: list[tuple[int, dict] | None],
    swapped: list[int | None],
    objects: list[list[dict]],
    flip: np.ndarray,
) -> tuple[
    list[tuple[int, dict]], list[tuple[int, dict] | None], list[int | None], list[list[dict]]
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


def make_optimizer(
    params: list[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in params:
        (no_decay if p.ndim < 2 or "embed" in name or name.endswith("query") else decay).append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.98),
    )


@dataclass
class Phase:
    """One phase of a run: steps [start, start + steps) train ``params`` at ``lr`` under
    warmup and cosine decay."""

    name: str
    start: int
    steps: int
    lr: float
    warmup: int
    params: list[tuple[str, torch.nn.Parameter]]

    def lr_at(self, step: int, min_lr_scale: float) -> float:
        return self.lr * warmup_cosine(step - self.start, self.warmup, self.steps, min_lr_scale)


def phase_at(model: PretrainModel, cfg: PretrainConfig, step: int) -> Phase:
    """The phase that step ``step`` belongs to: the whole model for ``steps``, then the heads
    of ``head_modules`` on the locked backbone for ``head_steps``."""
    if step < cfg.steps:
        return Phase("joint", 0, cfg.steps, cfg.learning_rate, cfg.warmup_steps, model.trainable())
    warmup = min(cfg.warmup_steps, cfg.head_steps // 10)
    return Phase(
        "heads", cfg.steps, cfg.head_steps, cfg.head_learning_rate, warmup, head_params(model, cfg)
    )


def begin_phase(model: PretrainModel, cfg: PretrainConfig, step: int) -> Phase:
    """:func:`phase_at` for a phase that starts at ``step``; at the switch to the second phase
    with ``head_seed``, the word-order and claim heads are drawn anew from it first."""
    phase = phase_at(model, cfg, step)
    at_switch = phase.name == "heads" and step == cfg.steps and cfg.head_steps > 0
    if at_switch and cfg.head_seed is not None:
        model.reset_word_order(cfg.head_seed)
    return phase


def trainable_state(model: PretrainModel) -> dict[str, torch.Tensor]:
    names = {n for n, _ in model.trainable()}
    return {k: v for k, v in model.state_dict().items() if k in names}


def build_model(cfg: PretrainConfig) -> PretrainModel:
    torch.manual_seed(cfg.seed)
    return PretrainModel(
        cfg.backbone,
        cfg.temperature,
        cfg.text_order_layers,
        cfg.image_cells,
        cfg.text_order_width,
        cfg.text_order_norm,
        cfg.head_cells,
    )


def _check_corpus(corpus: Corpus) -> None:
    if not corpus.split("train"):
        raise MobileVLAError(f"corpus folder '{corpus.folder}' has no training images")
    if not corpus.split("val"):
        raise MobileVLAError(f"corpus folder '{corpus.folder}' has no held-out images")


# what may differ between a run and one that redoes its second phase (``heads_from``)
SECOND_PHASE_KEYS = (
    "head_steps",
    "head_modules",
    "head_batch_size",
    "head_learning_rate",
    "head_mirror",
    "head_seed",
    "head_cells",
    "eval_every",
    "checkpoint_every",
)


def _first_phase_of(run: Path, cfg: PretrainConfig) -> Path:
    """``run``'s ``checkpoints/phase1``, after checking that ``cfg`` differs from the config
    it was trained with in second-phase keys only."""
    first = run / "checkpoints" / "phase1"
    if not first.is_dir():
        raise MobileVLAError(
            f"--heads-from: '{run}' has no checkpoints/phase1 (a run with head_steps > 0 "
            "keeps its state at the end of the first phase there)"
        )
    if cfg.head_steps <= 0:
        raise MobileVLAError("--heads-from redoes the second phase: head_steps must be > 0")
    theirs = load_folder(first)["config"]
    changed = [
        k for k, v in to_dict(cfg).items() if k not in SECOND_PHASE_KEYS and theirs.get(k) != v
    ]
    if changed:
        raise MobileVLAError(
            f"--heads-from: the first phase in '{first}' was trained with other {changed}; "
            f"only the second phase's keys may differ ({', '.join(SECOND_PHASE_KEYS)})"
        )
    return first


def pretrain(
    cfg: PretrainConfig,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    command: str = "",
    heads_from: str | Path | None = None,
) -> Path:
    """Train (or resume) a pretraining run in ``out``; evaluate and export at the end. With
    ``heads_from`` (another run with ``head_steps``), the first phase is that run's
    (``checkpoints/phase1``) and only the second phase trains, with ``cfg``'s second-phase
    keys: the result is the run ``cfg`` would give from scratch."""
    from mobile_vla.pretraining.evaluate import evaluate, quick_recall

    out = Path(out)
    last = out / "checkpoints" / "last"
    first = None
    if heads_from is not None:
        if resume:
            raise MobileVLAError("--heads-from starts a new run; it does not go with --resume")
        first = _first_phase_of(Path(heads_from), cfg)
    if resume:
        if not last.exists():
            raise MobileVLAError(f"--resume: pretraining run '{out}' has no checkpoints/last")
        saved = load_config(out / "config.yaml", cls=PretrainConfig)
        if to_dict(saved) != to_dict(cfg):
            changed = [k for k, v in to_dict(cfg).items() if to_dict(saved).get(k) != v]
            raise MobileVLAError(
                f"--resume: the config differs from '{out / 'config.yaml'}' in {changed}; "
                "resume with the run's own config"
            )
    elif out.exists() and any(out.iterdir()):
        raise MobileVLAError(
            f"pretraining run folder '{out}' is not empty; use --resume to continue it"
        )
    corpus = load_corpus(cfg.data)
    _check_corpus(corpus)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        save_config(cfg, out / "config.yaml")
    if first is not None:  # the new run starts at the switch, with the other run's log so far
        shutil.copytree(first, out / "checkpoints" / "phase1")
        shutil.copytree(first, last)
        log = Path(heads_from) / "log.csv"  # type: ignore[arg-type]
        if log.exists():
            rows = log.read_text().splitlines()
            kept = [r for r in rows[1:] if r and int(r.split(",")[0]) <= cfg.steps]
            atomic_write_text(out / "log.csv", "\n".join([rows[0], *kept]) + "\n")
        resume = True
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build_model(cfg)
    ts, texts = prepare(corpus, cfg.seed)
    table = encode_texts(model, texts, progress)
    ts = _index(ts, table)
    images = torch.from_numpy(np.array(corpus.images))  # in memory: random batches
    total = cfg.steps + cfg.head_steps
    step, seconds = 0, 0.0
    state = None
    if resume:
        state = load_folder(last)
        result = model.load_state_dict(state["model"], strict=False)
        if result.unexpected_keys:
            raise MobileVLAError(f"checkpoint '{last}' does not fit this model")
        step, seconds = int(state["step"]), float(state["seconds"])
    # a run resumed at the switch (its last checkpoint is the first phase's end) begins the
    # second phase here, as the uninterrupted run does in the loop
    phase = begin_phase(model, cfg, step)
    optimizer = make_optimizer(phase.params, phase.lr, cfg.weight_decay)
    if state is not None and state.get("phase", "joint") == phase.name:
        optimizer.load_state_dict(state["optimizer"])  # not at the switch: a new optimizer
    precision = resolve_precision(cfg.precision)
    features = mirrored = None
    log_path = out / "log.csv"
    fields = [
        "step",
        "loss",
        "itc",
        "itm",
        "itm_acc",
        "attr",
        "fusion_attr",
        "order",
        "order_acc",
        "claim",
        "lr",
        "temperature",
        "val_r1",
        "seconds",
    ]
    if not log_path.exists():
        with open(log_path, "w", newline="") as fh:
            csv.writer(fh).writerow(fields)
    model.train()
    bar = tqdm(total=total, initial=step, desc="pretrain", unit="step", disable=not progress)
    start = time.perf_counter() - seconds
    while step < total:
        if phase.name == "joint" and step >= cfg.steps:  # the second phase begins
            phase = begin_phase(model, cfg, step)
            optimizer = make_optimizer(phase.params, phase.lr, cfg.weight_decay)
        # with a second phase the word-order head trains in that phase only
        model.order_active = cfg.head_steps == 0 or phase.name == "heads"
        lr = phase.lr_at(step, cfg.min_lr_scale)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            if phase.name == "joint":
                losses = step_losses(model, cfg, corpus, images, ts, table, step)
            else:
                if features is None:
                    tokens = image_side_trains(cfg)
                    features = image_features(model, images, ts.ids, precision, tokens)
                    if cfg.head_mirror:
                        mirrored = image_features(model, images, ts.ids, precision, tokens, True)
                losses = head_step_losses(
                    model, cfg, corpus, features, ts, table, step, mirrored=mirrored
                )
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in phase.params], 1.0)
        optimizer.step()
        step += 1
        row = {k: float(v.detach()) for k, v in losses.items()}
        row.update(step=step, lr=lr, temperature=1 / float(model.scale().detach()))
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            row["val_r1"] = quick_recall(model, corpus, cfg)
            model.train()
        row["seconds"] = time.perf_counter() - start
        with open(log_path, "a", newline="") as fh:
            csv.writer(fh).writerow(
                [
                    f"{row[f]:.6g}" if isinstance(row.get(f), float) else row.get(f, "")
                    for f in fields
                ]
            )
        shown = {"loss": f"{row['loss']:.3f}", "itc": f"{row['itc']:.3f}"}
        for key in ("itm_acc", "order_acc"):
            if key in row:
                shown[key] = f"{row[key]:.2f}"
        bar.set_postfix(shown)
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step in (cfg.steps, total):
            _save(last, model, optimizer, step, time.perf_counter() - start, cfg, phase.name)
        if cfg.head_steps and step == cfg.steps:  # kept: the second phase can be redone from it
            _save(
                out / "checkpoints" / "phase1",
                model,
                optimizer,
                step,
                time.perf_counter() - start,
                cfg,
                phase.name,
            )
        if not math.isfinite(row["loss"]):
            raise MobileVLAError(f"pretraining diverged at step {step} (loss {row['loss']})")
    model.order_active = True
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    metrics = evaluate(model, corpus, cfg, progress=progress)
    atomic_write_json(out / "metrics.json", metrics)
    export(out, model, cfg, corpus, metrics, seconds, command, precision)
    return out


def _save(
    path: Path,
    model: PretrainModel,
    optimizer: torch.optim.Optimizer,
    step: int,
    seconds: float,
    cfg: PretrainConfig,
    phase: str = "joint",
) -> None:
    save_folder(
        {
            "model": trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "phase": phase,
            "step": step,
            "seconds": seconds,
            "config": to_dict(cfg),
        },
        path,
    )


def load_run(run: str | Path) -> tuple[PretrainModel, PretrainConfig, dict[str, Any]]:
    """The model of a pretraining run (its last checkpoint), in eval mode."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise MobileVLAError(f"'{run}' is not a pretraining run folder (no config.yaml)")
    cfg = load_config(run / "config.yaml", cls=PretrainConfig)
    last = run / "checkpoints" / "last"
    if not last.exists():
        raise MobileVLAError(f"pretraining run '{run}' has no checkpoints/last")
    state = load_folder(last)
    model = build_model(cfg)
    try:
        result = model.load_state_dict(state["model"], strict=False)
    except RuntimeError as exc:
        raise MobileVLAError(
            f"checkpoint '{last}' is of another architecture ({str(exc).splitlines()[-1][:160]})"
        ) from None
    buffers = {n for n, _ in model.named_buffers()}  # set from the config, not saved
    missing = [k for k in result.missing_keys if ".text_encoder." not in k and k not in buffers]
    if missing or result.unexpected_keys:
        raise MobileVLAError(
            f"checkpoint '{last}' is of another architecture than '{run / 'config.yaml'}' "
            f"(missing {missing[:2]}, unexpected {result.unexpected_keys[:2]})"
        )
    model.eval()
    return model, cfg, state


def load_weights_file(weights: str | Path) -> PretrainModel:
    """A pretraining model (backbone and heads) from an exported weights file, in eval mode;
    the geometry comes from the file's model card."""
    from mobile_vla.config import BuiltinConfig
    from mobile_vla.pretraining.weights import load_weights, read_card

    arch = read_card(Path(weights)).get("architecture", {})
    cfg = BuiltinConfig(
        **{k: v for k, v in arch.items() if k in BuiltinConfig.__dataclass_fields__}
    )
    state = load_weights(weights, cfg)
    prefix = "heads.text_order.layers.layers."
    layers = len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})
    cells = (
        "heads.image_head.weight" in state
        and state["heads.image_head.weight"].shape[1] > 2 * cfg.vision_width
    )
    order_width = (
        int(state["heads.text_order.inp.weight"].shape[0])
        if "heads.text_order.inp.weight" in state
        else 0
    )
    model = PretrainModel(
        cfg,
        0.07,
        text_order_layers=layers,
        image_cells=cells,
        text_order_width=order_width,
        text_order_norm=float(state.get("heads.text_order.max_norm", torch.zeros(()))),
        head_cells="heads.cell_map.weight" in state,
    )
    model.load_export(state)
    model.eval()
    return model


def export(
    run: Path,
    model: PretrainModel,
    cfg: PretrainConfig,
    corpus: Corpus,
    metrics: dict[str, Any],
    seconds: float,
    command: str,
    precision: str = "32",
) -> Path:
    from mobile_vla.pretraining.weights import (
        SHIPPED_NAME,
        export_weights,
        model_card_markdown,
        read_card,
    )

    target = run / "export" / f"{SHIPPED_NAME}.safetensors"
    card = {
        "file": target.name,
        "corpus": {
            k: corpus.manifest.get(k)
            for k in ("images", "image_size", "seed", "splits", "captions_per_image", "command")
        },
        "steps": cfg.steps,
        "head_steps": cfg.head_steps,
        "batch_size": cfg.batch_size,
        "train_seconds": round(seconds, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        "precision": precision,
        "command": command,
        "pretrain_config": to_dict(cfg),
        "metrics": metrics.get("summary", {}),
    }
    export_weights(model.export_state(), cfg.backbone, target, card)
    atomic_write_text(run / "export" / "MODEL_CARD.md", model_card_markdown(read_card(target)))
    return target
