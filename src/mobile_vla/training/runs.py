"""The run folder, read back: what evaluation, analysis, serving, DAgger, the study and the
benches need of a trained run, below all of them (the trainer writes it, ``training.run``).

A run folder::

    config.yaml        the resolved config
    stats.json         action normalization statistics (training split)
    split.json         the episodes of each split
    params.json        trainable / total parameters per group, the resolved strategy
    checkpoints/last   safetensors + JSON, every epoch
    checkpoints/best   the lowest validation loss
    checkpoints/step_N the kept steps (``trainer.checkpoint_steps``)
    logs/              CSV and TensorBoard logs
    train_stats.json   samples/s (steady state: the loop's and the step's), peak memory, wall time
    metrics.json       what evaluations wrote (offline, closed loop, curve, ...)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mobile_vla.config import Config, load_config
from mobile_vla.data.normalization import ActionStats
from mobile_vla.errors import ConfigError, MobileVLAError
from mobile_vla.io import atomic_write_json
from mobile_vla.models.backbones.base import Backbone
from mobile_vla.models.policy import VLAPolicy
from mobile_vla.models.strategies import StrategyPlan, apply_strategy
from mobile_vla.training.checkpoint import load_folder

RUN_FILES = ("config.yaml", "stats.json", "split.json")


def build_policy(
    cfg: Config, stats: ActionStats, backbone: Backbone | None = None
) -> tuple[VLAPolicy, StrategyPlan]:
    """The policy with the strategy applied (LoRA injected, requires_grad set), seeded;
    ``backbone``, when given, is used instead of building the configured one."""
    torch.manual_seed(cfg.seed)
    policy = VLAPolicy(cfg, stats, backbone=backbone)
    check_window(cfg, policy)
    plan = apply_strategy(policy, cfg.train_setup)
    policy.train()  # after the strategy: frozen parts stay in eval mode
    return policy, plan


def check_window(cfg: Config, policy: VLAPolicy) -> None:
    """Refuse a window the backbone cannot take, before any training."""
    if cfg.backbone.history != "pre":
        return
    limit = policy.backbone.max_window()
    if cfg.data.window_size > limit:
        raise ConfigError(
            f"config key 'data.window_size' must be <= {limit} for backbone "
            f"'{cfg.backbone.name}' with history=pre, got {cfg.data.window_size}"
        )


def check_run(run: str | Path) -> Path:
    run = Path(run)
    if not run.is_dir():
        raise MobileVLAError(f"run folder '{run}' does not exist")
    missing = [f for f in RUN_FILES if not (run / f).is_file()]
    if missing:
        raise MobileVLAError(f"run folder '{run}' is incomplete: missing {', '.join(missing)}")
    return run


def merge_lora(policy: torch.nn.Module) -> int:
    """Fold every LoRA update into its base weight (W + B A s), for inference: the same
    function up to float rounding, without the two extra matmuls per wrapped layer. Returns
    how many layers were merged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = 0
    for module in policy.modules():
        if isinstance(module, BaseTunerLayer) and not module.merged:
            module.merge()
            merged += 1
    return merged


class Run:
    """A run folder, opened once: its config (with ``overrides``), action statistics and split
    are read when it is opened; its episodes, checkpoints, policy and ``metrics.json`` are
    reached through it. Paths convert it back (``os.fspath(run)``, ``Path(run)``)."""

    def __init__(self, path: str | Path, overrides: list[str] | None = None) -> None:
        self.path = check_run(path)
        self.config: Config = load_config(self.path / "config.yaml", overrides or [])
        self.stats = ActionStats.load(self.path / "stats.json")
        self.split: dict[str, list[str]] = json.loads((self.path / "split.json").read_text())
        self._loaded: tuple[tuple[str, bool], VLAPolicy] | None = None

    @classmethod
    def open(cls, run: str | Path | Run, overrides: list[str] | None = None) -> Run:
        """``run`` itself when it is already open (and no overrides are asked), else a new
        handle on the folder."""
        if isinstance(run, Run) and not overrides:
            return run
        return cls(run.path if isinstance(run, Run) else run, overrides)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def scoring_split(self) -> str:
        """The split offline figures are reported on: ``test`` when the run has one, else
        ``val``."""
        return "test" if self.split.get("test") else "val"

    def episodes(self, part: str = "val") -> list[Any]:
        """The run's episodes of split ``part`` (``split.json``), read from its config's data
        folder."""
        from mobile_vla.data.episodes import load_episodes
        from mobile_vla.errors import DataError

        names = self.split.get(part, [])
        by_name = {e.path.name: e for e in load_episodes(self.config.data)}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise DataError(
                f"{part} episodes of run '{self.path}' are missing from "
                f"'{self.config.data.path}': {missing[:5]}"
            )
        return [by_name[n] for n in names]

    def metrics(self) -> dict[str, Any]:
        """``metrics.json`` (empty before any evaluation)."""
        path = self.path / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def update_metrics(self, key: str, value: dict[str, Any]) -> None:
        """Set ``metrics.json[key]``, keeping what other evaluations wrote there."""
        metrics = self.metrics()
        metrics[key] = value
        atomic_write_json(self.path / "metrics.json", metrics)

    def step_checkpoints(self) -> list[Path]:
        """The ``checkpoints/step_N`` folders, in step order."""
        folder = self.path / "checkpoints"
        found = [p for p in folder.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
        return sorted(found, key=lambda p: int(p.name[5:]))

    def checkpoint(self, which: str = "best") -> Path:
        """The folder of checkpoint ``which`` (``best`` falls back to ``last``)."""
        folder = self.path / "checkpoints" / which
        if which not in ("best", "last") and not folder.exists():
            kept = ", ".join(p.name for p in self.step_checkpoints()) or "none"
            raise MobileVLAError(
                f"run folder '{self.path}' has no checkpoint '{which}' (step checkpoints kept: "
                f"{kept}; trainer.checkpoint_steps chooses them; 'selected' is made by "
                f"`mobile-vla curve {self.path} --select`)"
            )
        if not folder.exists():
            folder = self.path / "checkpoints" / "last"
        if not folder.exists():
            raise MobileVLAError(
                f"run folder '{self.path}' has no checkpoint (checkpoints/best or last)"
            )
        return folder

    def policy(self, which: str = "best", merge: bool = True) -> VLAPolicy:
        """The trained policy of checkpoint ``which``, in eval mode, with LoRA updates merged
        into the base weights (inference only; ``merge=False`` keeps them apart, for
        bit-exact comparisons with the training process). The last one loaded is kept, so
        the evaluations of one command load it once."""
        if self._loaded is not None and self._loaded[0] == (which, merge):
            return self._loaded[1]
        policy = self._load(self.checkpoint(which), merge)
        self._loaded = ((which, merge), policy)
        return policy

    def _load(self, folder: Path, merge: bool) -> VLAPolicy:
        from mobile_vla.training.common import check_architecture

        checkpoint = load_folder(folder)
        policy, _ = build_policy(self.config, self.stats)
        # the policy's tensors only (a training-time read-out, e.g. instruction_aux, is not
        # part of it)
        state = {
            k.removeprefix("policy."): v
            for k, v in checkpoint.get("state_dict", {}).items()
            if k.startswith("policy.")
        }
        check_architecture(
            {"architecture": checkpoint.get("architecture", {}), "state_dict": state},
            self.config,
            policy.state_dict(),
            f"checkpoint '{folder}'",
        )
        missing = policy.load_state_dict(state, strict=False)
        if missing.unexpected_keys:  # pragma: no cover - check_architecture refuses these first
            raise ConfigError(f"checkpoint '{folder}' has unexpected tensors")
        policy.eval()
        policy.requires_grad_(False)
        if merge:
            merge_lora(policy)
        return policy


def load_policy(
    run: str | Path | Run,
    which: str = "best",
    overrides: list[str] | None = None,
    merge: bool = True,
) -> tuple[VLAPolicy, Config]:
    """The trained policy of a run folder and its config, for callers that need nothing
    else of the run (:meth:`Run.policy`)."""
    handle = Run.open(run, overrides)
    return handle.policy(which, merge), handle.config
