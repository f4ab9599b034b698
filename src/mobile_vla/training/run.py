"""``mobile-vla train``: a new (or resumed) run folder, trained with Lightning: the config,
the action statistics and the split first, then checkpoints (every epoch, the best on
validation, the kept steps), logs and ``train_stats.json`` (samples/s, peak memory, wall
time). The folder's layout, and everything that reads it back, is in ``training.runs``."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import time
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from mobile_vla.config import Config, save_config
from mobile_vla.data.dataset import DataBundle, build_datasets
from mobile_vla.data.normalization import ActionStats, Normalizer
from mobile_vla.errors import ConfigError, MobileVLAError
from mobile_vla.hardware import resolve_precision
from mobile_vla.io import atomic_write_json, folder_lock
from mobile_vla.models.policy import VLAPolicy
from mobile_vla.models.strategies import format_table
from mobile_vla.training.checkpoint import is_complete, recover
from mobile_vla.training.common import TrainStats
from mobile_vla.training.runs import build_policy

log = logging.getLogger(__name__)


def _devices(text: str) -> Any:
    if text == "auto":
        return "auto"
    if text.isdigit() or text == "-1":
        return int(text)
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"config key 'trainer.devices' must be auto, a count or a list of indices, got {text!r}"
        ) from None


def make_loaders(cfg: Config, bundle: DataBundle) -> tuple[DataLoader, DataLoader]:
    from mobile_vla.training.common import collate
    from mobile_vla.training.module import EpochSampler, counterfactual_groups, window_runs

    t = cfg.trainer
    kw: dict[str, Any] = {"batch_size": t.batch_size, "num_workers": t.num_workers}
    base = getattr(bundle.train, "base", bundle.train)
    runs = window_runs(base.index, t.consecutive_windows)
    groups = counterfactual_groups(base.episodes, base.index) if t.counterfactual_pairs else None
    train = DataLoader(
        bundle.train,
        sampler=EpochSampler(len(bundle.train), cfg.seed, True, runs, groups),
        collate_fn=getattr(bundle.train, "collate", collate),
        **kw,
    )
    val = DataLoader(
        bundle.val,
        sampler=EpochSampler(len(bundle.val), cfg.seed, False),
        collate_fn=getattr(bundle.val, "collate", collate),
        **kw,
    )
    return train, val


def new_run_dir(cfg: Config) -> Path:
    name = cfg.trainer.run_name or (
        f"{cfg.train_setup.strategy}-{cfg.backbone.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    )
    run = Path(cfg.trainer.output_dir) / name
    folder = run / "checkpoints"
    # a run killed during its first checkpoint write holds no checkpoint: it starts anew
    if any(is_complete(recover(folder / w)) for w in ("last", "best")):
        raise MobileVLAError(
            f"run folder '{run}' already holds checkpoints; resume it with --resume {run} or "
            "choose another trainer.run_name"
        )
    return run


def train(
    cfg: Config,
    resume: Path | None = None,
    progress: bool = True,
    callbacks: list[Any] | None = None,
) -> Path:
    """Train per ``cfg`` into a new run folder (or continue ``resume``); returns the folder.
    ``callbacks`` are extra Lightning callbacks."""
    import lightning.pytorch as pl

    from mobile_vla.training.checkpoint_io import SafeCheckpointIO
    from mobile_vla.training.module import PolicyModule, RunCheckpoints, TrainStatsMeter

    run = resume if resume is not None else new_run_dir(cfg)
    ckpt = _last_checkpoint(run) if resume is not None else None
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    bundle = build_datasets(cfg, progress=progress)
    if not len(bundle.val):
        raise ConfigError("the validation split is empty: raise data.val_fraction or add episodes")
    if resume is not None:
        _check_resume_data(run, bundle)
    policy, plan = build_policy(cfg, bundle.stats)
    if cfg.train_setup.init_checkpoint and resume is None:  # before the feature cache's hash
        from mobile_vla.training.checkpoint import load_init_weights

        log.info(load_init_weights(policy, cfg.train_setup.init_checkpoint))
    cache_start = time.perf_counter()
    feature_cache = _use_feature_cache(cfg, policy, bundle, progress)
    cache_seconds = time.perf_counter() - cache_start
    module = PolicyModule(cfg, policy, plan)
    train_loader, val_loader = make_loaders(cfg, bundle)
    t = cfg.trainer
    loggers = _loggers(run, t.wandb)
    stats_cb = TrainStatsMeter(steps=cfg.trainer.checkpoint_steps)
    precision = resolve_precision(t.precision, t.accelerator)  # "auto" decided once, recorded
    # settings Lightning refuses are reported before anything is written
    trainer = _make_trainer(
        pl,
        t,
        run,
        loggers,
        [RunCheckpoints(run / "checkpoints", t.checkpoint_steps), stats_cb, *(callbacks or [])],
        SafeCheckpointIO(),
        progress,
        precision,
    )

    # one writer per run folder: a second train (or an orphan) into it is refused by PID (the
    # other ranks of a multi-device run write through rank 0)
    held = (
        folder_lock(run, "mobile-vla train", log.warning)
        if trainer.is_global_zero
        else contextlib.nullcontext()
    )
    with held:
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml")
        if resume is None:
            bundle.stats.save(run / "stats.json")
            bundle.split.save(run / "split.json")
        atomic_write_json(run / "params.json", plan.to_json())
        _announce(run, cfg, plan, progress and trainer.is_global_zero)
        start = time.perf_counter()
        trainer.fit(module, train_loader, val_loader, ckpt_path=str(ckpt) if ckpt else None)
        if trainer.is_global_zero:
            result = TrainStats(
                **stats_cb.result(),
                wall_time_s=time.perf_counter() - start,
                global_step=trainer.global_step,
                epochs=trainer.current_epoch,
                feature_cache=feature_cache,
                feature_cache_s=cache_seconds,
                precision=precision,
            )
            atomic_write_json(run / "train_stats.json", result.to_json())
    return run


def _last_checkpoint(run: Path) -> Path:
    """The checkpoint a resumed run continues from (``checkpoints/last``, recovered from an
    interrupted save)."""
    ckpt = recover(run / "checkpoints" / "last")
    if not ckpt.exists():
        raise MobileVLAError(
            f"cannot resume '{run}': it has no checkpoints/last (it stopped before its first "
            "checkpoint); start it again with 'train CONFIG' and the same trainer.run_name"
        )
    return ckpt


def _announce(run: Path, cfg: Config, plan: Any, echo: bool) -> None:
    """The run folder and what the strategy trains, to the log (and stdout with ``echo``)."""
    log.info("run folder: %s\n%s", run, format_table(plan.table))
    if echo:
        print(
            f"run folder: {run}\nstrategy {cfg.train_setup.strategy}:\n{format_table(plan.table)}"
        )


def _loggers(run: Path, use_wandb: bool) -> list[Any]:
    """CSV and TensorBoard loggers in ``run/logs`` (a resumed run logs beside, never over,
    earlier logs), and Weights & Biases when asked for."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    csv_version, n = "csv", 1
    while (run / "logs" / csv_version).exists():
        n += 1
        csv_version = f"csv-{n}"
    loggers: list[Any] = [
        CSVLogger(run, name="logs", version=csv_version),
        TensorBoardLogger(run, name="logs", version="tensorboard"),
    ]
    if use_wandb:
        from lightning.pytorch.loggers import WandbLogger

        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError(
                "config key 'trainer.wandb' needs the wandb package (pip install wandb)"
            ) from None
        loggers.append(WandbLogger(save_dir=str(run), name=run.name))
    return loggers


def _use_feature_cache(cfg: Config, policy: VLAPolicy, bundle: DataBundle, progress: bool) -> str:
    """Swap the datasets for cached-prefix ones when that is exact; say which in the log."""
    from mobile_vla.data.frame_cache import FrameCache
    from mobile_vla.training.feature_cache import CachedPrefixDataset, PrefixCache, cache_split

    split, reason = cache_split(cfg, policy)
    if split is not None and not isinstance(bundle.train.frames, FrameCache):
        split, reason = None, "data.frame_cache is off"
    if split is None:
        message = f"feature cache: live ({reason})"
    else:
        cache = PrefixCache(cfg, policy, bundle.train.frames, split)
        cache.ensure(bundle.train.episodes + bundle.val.episodes, progress=progress)
        bundle.train = CachedPrefixDataset(bundle.train, cache)  # type: ignore[assignment]
        bundle.val = CachedPrefixDataset(bundle.val, cache)  # type: ignore[assignment]
        what = "frozen prefix" if reason == "backbone frozen" else f"prefix ({reason})"
        message = f"feature cache: cached {what} in {cache.root}"
    log.info(message)
    if progress:
        print(message)
    return message


def _check_resume_data(run: Path, bundle: DataBundle) -> None:
    """A resumed run must see the data it started with: same split, and it keeps the
    normalization statistics its weights were trained with."""
    saved = json.loads((run / "split.json").read_text())
    if saved != bundle.split.to_json():
        raise MobileVLAError(
            f"cannot resume '{run}': the dataset's episodes changed since the run started "
            "(split.json differs)"
        )
    saved_stats = ActionStats.load(run / "stats.json")
    bundle.stats = saved_stats
    bundle.normalizer = bundle.train.normalizer = bundle.val.normalizer = Normalizer(
        saved_stats,
        bundle.train.cfg.normalization,
        (bundle.train.cfg.norm_min, bundle.train.cfg.norm_max),
    )


def _make_trainer(
    pl: Any,
    t: Any,
    run: Path,
    loggers: list[Any],
    callbacks: list[Any],
    checkpoint_io: Any,
    progress: bool,
    precision: str,
) -> Any:
    """Lightning's trainer for ``t``; settings Lightning refuses become a ConfigError that
    names them."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return pl.Trainer(
            max_epochs=t.max_epochs if t.max_epochs > 0 else -1,
            max_steps=t.max_steps,
            precision=precision,
            accumulate_grad_batches=t.accumulate_grad_batches,
            gradient_clip_val=t.gradient_clip_val or None,
            gradient_clip_algorithm="norm",
            accelerator=t.accelerator,
            devices=_devices(t.devices),
            strategy=t.strategy,
            logger=loggers,
            callbacks=callbacks,
            plugins=[checkpoint_io],
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,
            log_every_n_steps=t.log_every_n_steps,
            limit_val_batches=t.limit_val_batches
            if t.limit_val_batches <= 1
            else int(t.limit_val_batches),
            # every N optimizer steps across epochs (Lightning counts batches: N x accumulation)
            val_check_interval=t.val_every_n_steps * t.accumulate_grad_batches or None,
            check_val_every_n_epoch=None if t.val_every_n_steps else 1,
            enable_progress_bar=progress,
            enable_model_summary=False,
            default_root_dir=str(run),
        )
    except (ValueError, RuntimeError, TypeError, MisconfigurationException) as exc:
        raise ConfigError(
            f"Lightning refused the trainer settings (trainer.accelerator="
            f"{t.accelerator!r}, devices={t.devices!r}, strategy={t.strategy!r}, "
            f"precision={t.precision!r}): {str(exc).splitlines()[0]}"
        ) from None
