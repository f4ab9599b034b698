"""The Lightning module around a :class:`VLAPolicy`, its sampler and its callbacks."""

from __future__ import annotations

import math
import random
import resource
import time
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from mobile_vla.config import Config, to_dict
from mobile_vla.models.policy import VLAPolicy
from mobile_vla.models.strategies import StrategyPlan
from mobile_vla.training.common import architecture, check_architecture, warmup_cosine


class EpochSampler(Sampler[int]):
    """Shuffled indices from a generator seeded by (seed, epoch), split across DDP ranks.

    With ``runs`` (a run id per index, indices of one run contiguous and in order) the
    shuffle moves whole runs, so the indices of a run stay together and in order (the
    ``trainer.consecutive_windows`` batches). Lightning calls ``set_epoch``; no global RNG
    is touched, so an epoch's order is the same in a resumed run."""

    def __init__(
        self,
        length: int,
        seed: int,
        shuffle: bool,
        runs: np.ndarray | None = None,
        groups: list[np.ndarray] | None = None,
    ) -> None:
        self.length, self.seed, self.shuffle, self.epoch = length, seed, shuffle, 0
        self.runs = None
        if runs is not None:
            if len(runs) != length:
                raise ValueError(f"runs has {len(runs)} entries for {length} indices")
            starts = np.flatnonzero(np.r_[True, runs[1:] != runs[:-1]])
            self.runs = np.split(np.arange(length), starts[1:])
        elif groups is not None:  # explicit groups (any indices), kept together and in order
            flat = np.sort(np.concatenate(groups)) if groups else np.zeros(0, np.int64)
            if not np.array_equal(flat, np.arange(length)):
                raise ValueError("groups must hold every index exactly once")
            self.runs = list(groups)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        if not self.shuffle:
            order = np.arange(self.length)
        elif self.runs is not None:
            order = np.concatenate([self.runs[r] for r in rng.permutation(len(self.runs))])
        else:
            order = rng.permutation(self.length)
        rank, world = self._rank()
        if world > 1:  # pad to a multiple of the world size, then stride (runs: blocks)
            pad = (-len(order)) % world
            order = np.concatenate([order, order[:pad]])
            blocks = self.runs is not None
            order = order.reshape(world, -1)[rank] if blocks else order[rank::world]
        return iter(order.tolist())

    def __len__(self) -> int:
        _, world = self._rank()
        return math.ceil(self.length / world)


def counterfactual_groups(episodes: list[Any], index: np.ndarray) -> list[np.ndarray] | None:
    """Sampler groups for ``trainer.counterfactual_pairs``: each counterfactual twin's windows
    with its source's first window (the frames they share), every other window alone; None
    when no twin's source is among ``episodes``. ``index`` is the dataset's (episode, frame)
    per window."""
    names = {ep.path.stem: e for e, ep in enumerate(episodes)}
    twins: dict[int, list[int]] = {}
    for e, ep in enumerate(episodes):
        src = names.get(ep.source) if getattr(ep, "source", None) else None
        if src is not None:
            twins.setdefault(src, []).append(e)
    if not twins:
        return None
    by_episode: dict[int, list[int]] = {}
    for i, (e, _) in enumerate(index.tolist()):
        by_episode.setdefault(e, []).append(i)
    groups, taken = [], set()
    for e, windows in sorted(by_episode.items()):
        if e in taken:
            continue
        first = [windows[0]]
        for twin in twins.get(e, ()):
            first += by_episode.get(twin, [])
            taken.add(twin)
        groups.append(np.asarray(first))
        groups += [np.asarray([w]) for w in windows[1:]]
    for twin_list in twins.values():  # twins whose source has no window (too short)
        for twin in twin_list:
            if twin not in taken and twin in by_episode:
                groups += [np.asarray([w]) for w in by_episode[twin]]
    return groups


def window_runs(index: np.ndarray, k: int) -> np.ndarray | None:
    """Run ids for an (episode, frame) sample index grouped into runs of ``k`` consecutive
    windows of one episode (None for k = 1)."""
    if k <= 1:
        return None
    episode, frame = index[:, 0], index[:, 1]
    return episode * (int(frame.max()) // k + 1) + frame // k


#: the auxiliary read-out's learning rate, as a multiple of the head's
AUX_LR_SCALE = 10.0


def instruction_sides(texts: list[str]) -> torch.Tensor:
    """+1 left, -1 right, 0 neither, per instruction."""
    from mobile_vla.data.dataset import side_of_instruction

    return torch.tensor([side_of_instruction(t) for t in texts])


def instruction_aux_loss(
    readout: torch.nn.Module, frames: torch.Tensor, texts: list[str]
) -> torch.Tensor | None:
    """``train_setup.instruction_aux_weight``'s loss: binary cross-entropy of a linear read-out
    of the action-token outputs ``frames`` (U, F), standardized over the batch, against the
    side each frame's instruction names; None when fewer than two frames name one or every
    one names the same side (nothing to tell apart)."""
    sides = instruction_sides(texts).to(frames.device)
    keep = sides != 0
    if int(keep.sum()) < 2 or len(set(sides[keep].tolist())) < 2:
        return None
    x = frames[keep].float()
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    target = (sides[keep] > 0).to(z.dtype)
    return torch.nn.functional.binary_cross_entropy_with_logits(readout(z)[:, 0], target)


class PolicyModule(pl.LightningModule):
    def __init__(self, cfg: Config, policy: VLAPolicy, plan: StrategyPlan) -> None:
        super().__init__()
        self.cfg, self.policy, self.plan = cfg, policy, plan
        self.strict_loading = False  # frozen pretrained weights are not in checkpoints
        # train_setup.instruction_aux_weight: a read-out trained beside the policy, never part
        # of it (load_policy reads only the policy's tensors)
        self.aux_weight = cfg.train_setup.instruction_aux_weight
        self.aux_readout: torch.nn.Linear | None = None
        if self.aux_weight > 0:
            width = policy.backbone.hidden_size * cfg.backbone.n_action_tokens
            self.aux_readout = torch.nn.Linear(width, 1)

    # -- what a checkpoint holds ---------------------------------------------------------
    def saved_state_keys(self) -> set[str]:
        """Trainable tensors, everything gradual may unfreeze, and weights that cannot be
        reloaded from the pretrained source (e.g. the built-in backbone's random init)."""
        prefixes = tuple("policy.backbone." + p for p in self.policy.backbone.pretrained_prefixes)
        optimizable = {id(p) for g in self.plan.param_groups for p in g["params"]}
        keys = set()
        for name, p in self.named_parameters():
            if p.requires_grad or id(p) in optimizable or not name.startswith(prefixes):
                keys.add(name)
        for name, _ in self.named_buffers():
            if not name.startswith(prefixes):
                keys.add(name)
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.saved_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["architecture"] = architecture(self.cfg)
        # self-contained: the config and normalization statistics travel with the weights
        checkpoint["mobile_vla"] = {
            "config": to_dict(self.cfg),
            "stats": self.policy.normalizer.stats.to_json(),
        }
        checkpoint["gradual_stage"] = self.plan.stage
        checkpoint["rng"] = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_architecture(checkpoint, self.cfg, self.state_dict(), "resume")
        self.unfreeze_to(checkpoint.get("gradual_stage", 0))
        rng = checkpoint.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])

    # -- training ---------------------------------------------------------------------------
    def _aux(self, out: Any) -> torch.Tensor | None:
        if self.aux_readout is None or out.frames is None:
            return None
        frames, texts = out.frames
        return instruction_aux_loss(self.aux_readout, frames, texts)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, out = self.policy.loss(batch)
        n = len(batch["instruction"])
        self.log("train_loss", loss, prog_bar=True, batch_size=n)
        aux = self._aux(out)
        if aux is not None:
            self.log("train_instruction_aux", aux, batch_size=n)
            loss = loss + self.aux_weight * aux
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """``val_loss`` is the action loss (what checkpoints are chosen on); the auxiliary
        read-out's loss, when it trains, is logged beside it."""
        loss, out = self.policy.loss(batch)
        n = len(batch["instruction"])
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        aux = self._aux(out)
        if aux is not None:
            self.log("val_instruction_aux", aux, sync_dist=True, batch_size=n)

    def on_train_epoch_start(self) -> None:
        loader = self.trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)
        # Lightning sets the sampler's epoch from its own progress counter, which is one ahead
        # after a resume from a checkpoint written at an epoch's end (the order of the epoch
        # after a resume differed from the uninterrupted run's); the iterator is created after
        # this hook, so the epoch the module sees decides
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, EpochSampler):
            sampler.set_epoch(self.current_epoch)
        # Lightning (2.6) restarted from a checkpoint written at an epoch's end enters the next
        # epoch with ``processed`` already counting it, so each resume put the counter that
        # ``max_epochs`` is checked against one epoch ahead (bench/bench_kills.py: killed 20
        # times, a run ended 20 epochs early). At an epoch's start it equals ``completed``.
        progress = self.trainer.fit_loop.epoch_progress
        for counts in (progress.current, progress.total):
            counts.processed = counts.completed
        ts = self.cfg.train_setup
        if ts.strategy == "gradual" and ts.gradual_every_steps == 0:
            self.unfreeze_to(self.current_epoch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        ts = self.cfg.train_setup
        if ts.strategy == "gradual" and ts.gradual_every_steps > 0:
            self.unfreeze_to(self.global_step // ts.gradual_every_steps)

    def unfreeze_to(self, stage: int) -> None:
        """gradual: unfreeze up to ``stage``; what is unfrozen leaves eval mode."""
        if self.plan.stage >= stage:
            return
        while self.plan.stage < stage and self.plan.unfreeze_next():
            pass
        self.policy.train(self.training)

    def configure_optimizers(self) -> Any:
        t = self.cfg.trainer
        groups = [{k: v for k, v in g.items()} for g in self.plan.param_groups]
        if self.aux_readout is not None:
            lr = AUX_LR_SCALE * self.cfg.train_setup.learning_rate
            groups.append(
                {"name": "instruction_aux", "params": list(self.aux_readout.parameters()), "lr": lr}
            )
        optimizer = torch.optim.AdamW(groups, weight_decay=t.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = t.warmup_steps
        if t.warmup_epochs > 0:  # RoboVLMs: warmup_epochs x optimizer steps per epoch, + steps
            batches = self.trainer.num_training_batches  # known once total is estimated
            per_epoch = (
                batches / t.accumulate_grad_batches
                if math.isfinite(batches)
                else total / max(1, t.max_epochs)
            )
            warmup += round(t.warmup_epochs * per_epoch)
        floor = 1.0 if t.lr_schedule == "constant" else t.min_lr_scale
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, warmup, total, floor)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def supervised_windows(batch: dict[str, Any]) -> int:
    """The (history, chunk) pairs a batch supervises: its rows, or with per-step windows
    (``action_mask`` (B, W, N)) the frames whose chunk has an action."""
    mask = batch.get("action_mask")
    if mask is None or mask.dim() < 3:
        return len(batch["instruction"])
    return int(mask.any(-1).sum())


class TrainStatsMeter(pl.Callback):
    """Samples/s over the steady state (after warm-up steps) and peak memory.

    Throughput is the training loop's: each batch counts from the end of the one before it,
    so fetching and collating the batch is included with its forward, backward and optimizer
    step. Batches that follow an epoch start or a validation pass are not timed. The step alone
    (batch start to batch end: what the data loading costs is the difference) is reported
    beside it. A sample is a batch row; ``windows`` counts the supervised (history, chunk)
    pairs: one per row, or with ``head.per_step`` one per real frame of the row's window, so
    per-step and one-window-per-frame training compare on what they learn from.

    For the budget a comparison states it also counts every supervised pair the run saw
    (``windows_seen``, warm-up included) and keeps a timeline of (optimizer step, seconds
    since training began) at each validation, each of ``steps`` (the kept checkpoints) and
    the end, so success at a checkpoint can be placed at the seconds it cost."""

    def __init__(self, warmup_steps: int = 3, steps: list[int] | None = None) -> None:
        self.warmup = warmup_steps
        self.samples = 0
        self.windows = 0
        self.windows_seen = 0
        self.timeline: list[tuple[int, float]] = []
        self.marks = set(steps or [])
        self._fit_start: float | None = None
        self.batches = 0
        self.timed = 0
        self.elapsed = 0.0
        self.step_elapsed = 0.0
        self._last_end: float | None = None
        self._start = 0.0

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._last_end = None

    def on_validation_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._last_end = None

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._mark(trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._mark(trainer.global_step)

    def _mark(self, step: int) -> None:
        if self._fit_start is None or (self.timeline and self.timeline[-1][0] == step):
            return
        self.timeline.append((int(step), round(time.perf_counter() - self._fit_start, 3)))

    def on_train_batch_start(
        self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = time.perf_counter()
        self.batches += 1
        self.windows_seen += supervised_windows(batch)
        if self.marks and trainer.global_step in self.marks:
            self._mark(trainer.global_step)
        if self.batches > self.warmup and self._last_end is not None:
            self.elapsed += now - self._last_end
            self.step_elapsed += now - self._start
            self.samples += len(batch["instruction"])
            self.windows += supervised_windows(batch)
            self.timed += 1
        self._last_end = now

    def result(self) -> dict[str, Any]:
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = {
            "train_samples_per_s": self.samples / self.elapsed if self.elapsed else None,
            "train_step_samples_per_s": (
                self.samples / self.step_elapsed if self.step_elapsed else None
            ),
            "train_windows_per_s": self.windows / self.elapsed if self.elapsed else None,
            "train_step_windows_per_s": (
                self.windows / self.step_elapsed if self.step_elapsed else None
            ),
            "steady_state_batches": self.timed,
            "windows_seen": self.windows_seen,
            "timeline": [list(p) for p in self.timeline],
            "peak_memory_bytes": peak_rss,
            "peak_memory_kind": "cpu_rss",
        }
        if torch.cuda.is_available():
            out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
            out["peak_memory_kind"] = "cuda_allocated"
        return out


class RunCheckpoints(pl.Callback):
    """``checkpoints/last`` after every epoch, ``checkpoints/best`` after each validation
    that reaches a new lowest validation loss and ``checkpoints/step_N`` after each of
    ``steps`` (learning curves), all written atomically through the trainer's checkpoint
    I/O."""

    def __init__(self, folder: Any, steps: list[int] | None = None) -> None:
        self.folder = folder
        self.best: float | None = None
        self.steps = set(steps or [])

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        step = trainer.global_step
        if step in self.steps and not (self.folder / f"step_{step}").exists():
            trainer.save_checkpoint(self.folder / f"step_{step}")

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        val = trainer.callback_metrics.get("val_loss")
        value = float(val) if val is not None else None
        if value is not None and (self.best is None or value < self.best):
            self.best = value
            trainer.save_checkpoint(self.folder / "best")

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.folder / "last")
