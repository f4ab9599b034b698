"""Offline metrics on held-out episodes, exactly as ``shared/specs/metrics.md`` defines them.

* ``val_loss``: the training objective on the validation split;
* ``rmse`` / ``mae`` per dimension and overall: over valid (sample, chunk step) pairs, in
  physical units (predictions denormalized, targets read raw from the files) — a true RMSE;
* ``direction_accuracy``: sign(pred linear_y) == sign(target linear_y) over valid (sample,
  chunk step) pairs whose |target linear_y| > ``DIRECTION_THRESHOLD``;
* ``instruction_sensitivity``: the same windows with left/right swapped in the instruction;
  mean |linear_y(orig) - linear_y(swapped)| of the first predicted action, and the share of
  samples whose sign flips.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mobile_vla.data.hdf5 import swap_left_right
from mobile_vla.evaluation.results import (
    DirectionAccuracy,
    InstructionSensitivity,
    OfflineMetrics,
    SensitivityHistogram,
)
from mobile_vla.models.policy import VLAPolicy

if TYPE_CHECKING:
    from mobile_vla.training.runs import Run

DIRECTION_THRESHOLD = 0.1  # m/s


def regression_metrics(
    pred: np.ndarray, target: np.ndarray, mask: np.ndarray, names: Sequence[str]
) -> dict[str, Any]:
    """pred/target (S, N, D) physical, mask (S, N) -> rmse/mae per dimension and overall."""
    valid = mask.astype(bool)
    p, t = pred[valid], target[valid]  # (V, D)
    err = p - t
    out: dict[str, Any] = {
        "rmse": {n: float(np.sqrt(np.mean(err[:, d] ** 2))) for d, n in enumerate(names)},
        "mae": {n: float(np.mean(np.abs(err[:, d]))) for d, n in enumerate(names)},
        "valid_steps": int(valid.sum()),
    }
    out["rmse"]["all"] = float(np.sqrt(np.mean(err**2)))
    out["mae"]["all"] = float(np.mean(np.abs(err)))
    return out


def direction_accuracy(
    pred_y: np.ndarray,
    target_y: np.ndarray,
    mask: np.ndarray,
    threshold: float = DIRECTION_THRESHOLD,
) -> DirectionAccuracy:
    sel = mask.astype(bool) & (np.abs(target_y) > threshold)
    n = int(sel.sum())
    acc = float(np.mean(np.sign(pred_y[sel]) == np.sign(target_y[sel]))) if n else None
    return DirectionAccuracy(acc, n, threshold)


SENSITIVITY_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def instruction_sensitivity(y_orig: np.ndarray, y_swap: np.ndarray) -> InstructionSensitivity:
    """First-action linear_y with the original and the left/right-swapped instruction: the
    mean |difference|, the share of sign flips, and the distribution of |difference|
    (quantiles, and a 20-bin histogram over [0, its maximum]) for the report's plot."""
    if not len(y_orig):
        return InstructionSensitivity(None, None, 0)
    diff = np.abs(np.asarray(y_orig, np.float64) - np.asarray(y_swap, np.float64))
    top = float(diff.max()) if diff.max() > 0 else 1.0
    counts, edges = np.histogram(diff, bins=20, range=(0.0, top))
    return InstructionSensitivity(
        float(diff.mean()),
        float(np.mean(np.sign(y_orig) * np.sign(y_swap) < 0)),
        len(y_orig),
        {str(q): float(np.quantile(diff, q)) for q in SENSITIVITY_QUANTILES},
        SensitivityHistogram([float(e) for e in edges], counts.tolist()),
    )


def episode_batches(dataset: Dataset, batch_size: int) -> list[list[int]]:
    """The dataset's windows in order, in batches of whole episodes (at least ``batch_size``
    windows, or one episode): the policy encodes each distinct frame of a batch once, so no
    frame is encoded twice because a batch boundary cut its episode's windows. A dataset
    without an episode index is cut every ``batch_size`` windows."""
    index = getattr(dataset, "index", None)
    n = len(dataset)  # type: ignore[arg-type]
    if index is None:
        return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    episodes = np.asarray(index)[:, 0]
    batches: list[list[int]] = []
    for i, episode in enumerate(episodes):
        if not batches or (len(batches[-1]) >= batch_size and episode != episodes[i - 1]):
            batches.append([])
        batches[-1].append(i)
    return batches


@torch.no_grad()
def evaluate_offline(
    policy: VLAPolicy, dataset: Dataset, batch_size: int = 16, progress: bool = False
) -> OfflineMetrics:
    from mobile_vla.training.common import collate

    policy.eval()
    device = policy.action_token.device
    names = policy.action_dims
    loader = DataLoader(
        dataset, batch_sampler=episode_batches(dataset, batch_size), collate_fn=collate
    )
    losses, weights = [], []
    preds, targets, masks, y_orig, y_swap = [], [], [], [], []
    has_y = "linear_y" in names
    yi = names.index("linear_y") if has_y else -1
    for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        loss, out = policy.loss(batch)
        n_valid = float(batch["action_mask"].sum())
        losses.append(float(loss) * n_valid)
        weights.append(n_valid)
        pred = policy.to_physical(policy.decode(out))
        preds.append(pred)
        targets.append(batch["actions_raw"].cpu().numpy())
        masks.append(batch["action_mask"].cpu().numpy())
        if has_y:
            swapped = {**batch, "instruction": [swap_left_right(t) for t in batch["instruction"]]}
            pred_s = policy.to_physical(policy.decode(policy(swapped)))
            y_orig.append(pred[:, 0, yi])
            y_swap.append(pred_s[:, 0, yi])
    pred_all, tgt_all, mask_all = (np.concatenate(x) for x in (preds, targets, masks))
    reg = regression_metrics(pred_all, tgt_all, mask_all, names)
    if has_y:
        direction = direction_accuracy(pred_all[..., yi], tgt_all[..., yi], mask_all)
        sensitivity = instruction_sensitivity(np.concatenate(y_orig), np.concatenate(y_swap))
    else:
        reason = "linear_y is not among the predicted dimensions"
        direction = DirectionAccuracy(None, reason=reason)
        sensitivity = InstructionSensitivity(None, reason=reason)
    return OfflineMetrics(
        val_loss=float(sum(losses) / max(sum(weights), 1.0)),
        rmse=reg["rmse"],
        mae=reg["mae"],
        samples=len(pred_all),
        valid_steps=reg["valid_steps"],
        direction_accuracy=direction,
        instruction_sensitivity=sensitivity,
    )


def evaluate_run(
    run: str | Path | Run,
    which: str = "best",
    batch_size: int = 16,
    progress: bool = True,
) -> OfflineMetrics:
    """Offline metrics of a run on its test episodes (validation episodes when it has no test
    split); writes ``metrics.json``."""
    from mobile_vla.data.dataset import EpisodeDataset, make_frame_source
    from mobile_vla.training.runs import Run

    run = Run.open(run)
    policy, cfg = run.policy(which), run.config
    part = run.scoring_split  # test when the run holds one out: best was chosen on val
    episodes = run.episodes(part)
    dataset = EpisodeDataset(
        episodes, cfg.data, policy.normalizer, False, cfg.seed, make_frame_source(cfg.data)
    )
    metrics = evaluate_offline(policy, dataset, batch_size, progress).of_run(
        split=part, episodes=len(episodes), seed=cfg.seed, checkpoint=which, run=str(run)
    )
    run.update_metrics("offline", metrics.to_json())
    return metrics


def format_offline(m: OfflineMetrics) -> str:
    """The offline metrics as ``eval`` prints them."""
    rmse = ", ".join(f"{k}={v:.4f}" for k, v in m.rmse.items())
    mae = ", ".join(f"{k}={v:.4f}" for k, v in m.mae.items())
    da = m.direction_accuracy
    sens = m.instruction_sensitivity
    lines = [
        f"offline metrics of {m.run} ({m.checkpoint}), split {m.split}: "
        f"{m.episodes} episodes, {m.samples} samples, seed {m.seed}",
        f"  val_loss {m.val_loss:.5f}",
        f"  rmse {rmse}",
        f"  mae  {mae}",
    ]
    if da.value is not None:
        lines.append(
            f"  direction_accuracy {da.value:.3f} ({da.count} steps with "
            f"|linear_y| > {da.threshold})"
        )
    if sens.mean_abs_diff is not None:
        lines.append(
            f"  instruction_sensitivity: mean |dy| {sens.mean_abs_diff:.4f}, "
            f"sign flips {sens.sign_flip_rate:.3f} ({sens.count} samples)"
        )
    return "\n".join(lines)
