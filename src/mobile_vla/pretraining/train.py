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
from torch import nn
from tqdm.auto import tqdm

from mobile_vla.config import load_config, save_config, to_dict
from mobile_vla.errors import MobileVLAError
from mobile_vla.hardware import resolve_precision
from mobile_vla.io import atomic_write_json, atomic_write_text
from mobile_vla.pretraining.caption_scenes import (
    perturb,
    swap_sides,
    true_facts,
)
from mobile_vla.pretraining.config import PretrainConfig
from mobile_vla.pretraining.corpus import Corpus, load_corpus
from mobile_vla.pretraining.losses import (
    TextTable,
    TrainSet,
    head_step_losses,
    image_features,
    image_side_trains,
    step_losses,
)
from mobile_vla.pretraining.model import HeadsConfig, PretrainModel
from mobile_vla.training.checkpoint import load_folder, save_folder
from mobile_vla.training.common import warmup_cosine

PERTURBATIONS = 4  # minimally changed captions prepared per training caption


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
            if swapped is not None and swapped[1] in truth:
                swapped = None  # e.g. a red box on each side: both captions are true
            per_swap.append(swapped[0] if swapped else None)
            texts.extend([swapped[0]] if swapped else [])
            options = []
            for _ in range(PERTURBATIONS):
                p = perturb(text, fact, rng)
                if p is not None and p[1] not in truth and p not in options:
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


def head_params(model: PretrainModel, cfg: PretrainConfig) -> list[tuple[str, nn.Parameter]]:
    """What the second phase trains: the parameters of ``cfg.head_modules``."""
    modules = [*cfg.head_modules, *(["cell_map"] if model.cell_map is not None else [])]
    names = tuple(m if m == "log_scale" else f"{m}." for m in modules)
    return [(n, p) for n, p in model.trainable() if n.startswith(names)]


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
    return PretrainModel(cfg.backbone, HeadsConfig.from_pretrain(cfg))


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
    "policy_probe_scenes",
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


LOG_FIELDS = [
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


def _check_run_folder(
    cfg: PretrainConfig, out: Path, resume: bool, heads_from: str | Path | None
) -> Path | None:
    """Refuse what cannot start or continue in ``out`` (before anything is written); the
    first phase to start from with ``heads_from``."""
    first = None
    if heads_from is not None:
        if resume:
            raise MobileVLAError("--heads-from starts a new run; it does not go with --resume")
        first = _first_phase_of(Path(heads_from), cfg)
    if resume:
        if not (out / "checkpoints" / "last").exists():
            raise MobileVLAError(f"--resume: pretraining run '{out}' has no checkpoints/last")
        saved = to_dict(load_config(out / "config.yaml", cls=PretrainConfig))
        if saved != to_dict(cfg):
            changed = [k for k, v in to_dict(cfg).items() if saved.get(k) != v]
            raise MobileVLAError(
                f"--resume: the config differs from '{out / 'config.yaml'}' in {changed}; "
                "resume with the run's own config"
            )
    elif out.exists() and any(out.iterdir()):
        raise MobileVLAError(
            f"pretraining run folder '{out}' is not empty; use --resume to continue it"
        )
    return first


def _open_run(
    cfg: PretrainConfig, out: Path, resume: bool, first: Path | None, heads_from: Any
) -> bool:
    """Write the run folder's start (config; with ``first``, the other run's first phase
    and its log up to the switch, which the new run resumes from); whether to resume."""
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        save_config(cfg, out / "config.yaml")
    if first is None:
        return resume
    shutil.copytree(first, out / "checkpoints" / "phase1")
    shutil.copytree(first, out / "checkpoints" / "last")
    log = Path(heads_from) / "log.csv"
    if log.exists():
        rows = log.read_text().splitlines()
        kept = [r for r in rows[1:] if r and int(r.split(",")[0]) <= cfg.steps]
        atomic_write_text(out / "log.csv", "\n".join([rows[0], *kept]) + "\n")
    return True


class _StepLog:
    """One ``log.csv`` row per step (appended: a resumed run continues the file) and the
    progress bar's summary."""

    def __init__(self, path: Path, step: int, total: int, progress: bool) -> None:
        self.path = path
        if not path.exists():
            with open(path, "w", newline="") as fh:
                csv.writer(fh).writerow(LOG_FIELDS)
        self.bar = tqdm(
            total=total, initial=step, desc="pretrain", unit="step", disable=not progress
        )

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh).writerow(
                [
                    f"{row[f]:.6g}" if isinstance(row.get(f), float) else row.get(f, "")
                    for f in LOG_FIELDS
                ]
            )
        shown = {"loss": f"{row['loss']:.3f}", "itc": f"{row['itc']:.3f}"}
        shown.update({k: f"{row[k]:.2f}" for k in ("itm_acc", "order_acc") if k in row})
        self.bar.set_postfix(shown)
        self.bar.update(1)


@dataclass
class _Batches:
    """What the steps read: the corpus, its images in memory (random batches), the training
    captions and their encoded texts, and — built at the first second-phase step — the ViT
    tokens of every training image (and of its mirror image)."""

    corpus: Corpus
    images: torch.Tensor
    ts: TrainSet
    table: TextTable
    precision: str
    features: torch.Tensor | None = None
    mirrored: torch.Tensor | None = None

    def losses(self, model: PretrainModel, cfg: PretrainConfig, phase: Phase, step: int) -> Any:
        # with a second phase the word-order head trains in that phase only
        model.order_active = cfg.head_steps == 0 or phase.name == "heads"
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16-mixed"):
            if phase.name == "joint":
                return step_losses(model, cfg, self.corpus, self.images, self.ts, self.table, step)
            if self.features is None:
                tokens = image_side_trains(cfg)
                self.features = image_features(
                    model, self.images, self.ts.ids, self.precision, tokens
                )
                if cfg.head_mirror:
                    self.mirrored = image_features(
                        model, self.images, self.ts.ids, self.precision, tokens, True
                    )
            return head_step_losses(
                model,
                cfg,
                self.corpus,
                self.features,
                self.ts,
                self.table,
                step,
                mirrored=self.mirrored,
            )


def _restore(
    model: PretrainModel, cfg: PretrainConfig, last: Path | None
) -> tuple[int, float, Phase, torch.optim.Optimizer]:
    """(step, seconds, phase, optimizer) to start from: step 0, or the ``last`` checkpoint's
    model, step, time and optimizer state."""
    step, seconds, state = 0, 0.0, None
    if last is not None:
        state = load_folder(last)
        if model.load_state_dict(state["model"], strict=False).unexpected_keys:
            raise MobileVLAError(f"checkpoint '{last}' does not fit this model")
        step, seconds = int(state["step"]), float(state["seconds"])
    # a run resumed at the switch (its last checkpoint is the first phase's end) begins the
    # second phase here, as the uninterrupted run does in the loop
    phase = begin_phase(model, cfg, step)
    optimizer = make_optimizer(phase.params, phase.lr, cfg.weight_decay)
    if state is not None and state.get("phase", "joint") == phase.name:
        optimizer.load_state_dict(state["optimizer"])  # not at the switch: a new optimizer
    return step, seconds, phase, optimizer


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

    # open the run
    out = Path(out)
    last = out / "checkpoints" / "last"
    first = _check_run_folder(cfg, out, resume, heads_from)
    corpus = load_corpus(cfg.data)
    _check_corpus(corpus)
    resume = _open_run(cfg, out, resume, first, heads_from)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build_model(cfg)
    ts, texts = prepare(corpus, cfg.seed)
    table = encode_texts(model, texts, progress)
    precision = resolve_precision(cfg.precision)
    data = _Batches(
        corpus, torch.from_numpy(np.array(corpus.images)), _index(ts, table), table, precision
    )
    total = cfg.steps + cfg.head_steps
    step, seconds, phase, optimizer = _restore(model, cfg, last if resume else None)
    steplog = _StepLog(out / "log.csv", step, total, progress)
    model.train()
    start = time.perf_counter() - seconds

    while step < total:
        if phase.name == "joint" and step >= cfg.steps:  # the second phase begins
            phase = begin_phase(model, cfg, step)
            optimizer = make_optimizer(phase.params, phase.lr, cfg.weight_decay)
        lr = phase.lr_at(step, cfg.min_lr_scale)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # losses and the step
        losses = data.losses(model, cfg, phase, step)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in phase.params], 1.0)
        optimizer.step()
        step += 1
        # log
        row = {k: float(v.detach()) for k, v in losses.items()}
        row.update(step=step, lr=lr, temperature=1 / float(model.scale().detach()))
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            row["val_r1"] = quick_recall(model, corpus, cfg)
            model.train()
        row["seconds"] = time.perf_counter() - start
        steplog.write(row)
        _keep_checkpoints(out, model, optimizer, step, row["seconds"], cfg, phase.name)
        if not math.isfinite(row["loss"]):
            raise MobileVLAError(f"pretraining diverged at step {step} (loss {row['loss']})")

    model.order_active = True
    steplog.bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    metrics = evaluate(model, corpus, cfg, progress=progress)
    atomic_write_json(out / "metrics.json", metrics)
    export(out, model, cfg, corpus, metrics, seconds, command, precision)
    return out


def _keep_checkpoints(
    out: Path,
    model: PretrainModel,
    optimizer: torch.optim.Optimizer,
    step: int,
    seconds: float,
    cfg: PretrainConfig,
    phase: str,
) -> None:
    """The last state every ``checkpoint_every`` steps and at each phase's end, and the first
    phase's end on its own (the second phase can be redone from it)."""
    if step % cfg.checkpoint_every == 0 or step in (cfg.steps, cfg.steps + cfg.head_steps):
        _save(out / "checkpoints" / "last", model, optimizer, step, seconds, cfg, phase)
    if cfg.head_steps and step == cfg.steps:
        _save(out / "checkpoints" / "phase1", model, optimizer, step, seconds, cfg, phase)


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

    card = read_card(Path(weights))
    arch = card.get("architecture", {})
    cfg = BuiltinConfig(
        **{k: v for k, v in arch.items() if k in BuiltinConfig.__dataclass_fields__}
    )
    if "heads" in card:
        heads = HeadsConfig.from_json(card["heads"])
    elif "pretrain_config" in card:  # cards written before the heads' config was stored
        heads = HeadsConfig.from_pretrain(card["pretrain_config"])
    else:
        raise MobileVLAError(
            f"model card of '{weights}' has neither 'heads' nor 'pretrain_config': the "
            "pretraining heads cannot be rebuilt (the backbone still loads as a policy's)"
        )
    state = load_weights(weights, cfg)
    model = PretrainModel(cfg, heads)
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
    from mobile_vla.pretraining.evaluate import policy_probe
    from mobile_vla.pretraining.weights import (
        SHIPPED_NAME,
        card_path,
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
        "heads": HeadsConfig.from_pretrain(cfg).to_json(),
        "metrics": metrics.get("summary", {}),
    }
    export_weights(model.export_state(), cfg.backbone, target, card)
    # what the policy will receive from these weights, beside the heads' figures
    full = read_card(target)
    if cfg.policy_probe_scenes:  # it loads the written weights, so the card is completed after
        full["policy_probe"] = policy_probe(target, cfg.backbone, cfg.policy_probe_scenes)
        atomic_write_json(card_path(target), full)
    atomic_write_text(run / "export" / "MODEL_CARD.md", model_card_markdown(full))
    return target
