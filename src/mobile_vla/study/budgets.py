"""What each arm of a comparison was given, and whether two arms got the same.

A comparison between strategies means something only at equal budgets: the same data,
optimizer steps, batch, supervised pairs seen, schedule and checkpoint rule
(``shared/specs/metrics.md``, "Budgets"). :func:`run_budget` reads a finished run folder's
budget; :func:`budget_differences` lists what differs between two arms beyond what the
strategy itself changes (which parameters train and their own learning rates: LoRA's,
the backbone's), so that every verdict can say in its own line whether it compares like
with like.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mobile_vla.training.common import TrainStats

#: what the study evaluates: the checkpoint with the lowest validation loss
CHECKPOINT_RULES = {
    "best": "lowest validation loss",
    "last": "the last step",
    "selected": "closed-loop success on validation scenes",
}
#: how a budget key reads in a verdict line
LABELS = {
    "counterfactual": "counterfactual twins",
    "instruction_aux_weight": "instruction read-out weight",
}
#: learning-rate groups every strategy has; the others belong to what the strategy trains
SHARED_GROUPS = ("head", "action_token")


def run_budget(
    run: Path,
    metrics: dict[str, Any],
    stats: TrainStats,
    params: dict[str, Any],
    train_episodes: int,
) -> dict[str, Any]:
    """The budget of a finished run folder (its ``config.yaml``, ``train_stats.json``,
    ``params.json`` and the checkpoint its closed loop evaluated)."""
    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    trainer = cfg.get("trainer", {})
    data = cfg.get("data", {})
    lrs: dict[str, float] = {}
    for group in params.get("groups", []):
        lrs.setdefault(str(group["name"]).removesuffix("_no_decay"), float(group["lr"]))
    which = (metrics.get("closed_loop") or {}).get("checkpoint") or "best"
    return {
        "strategy": cfg.get("train_setup", {}).get("strategy"),
        "train_episodes": train_episodes,
        "steps": stats.global_step,
        "batch": int(trainer.get("batch_size", 0)) * int(trainer.get("accumulate_grad_batches", 1)),
        "window": data.get("window_size"),
        "per_step": bool(cfg.get("head", {}).get("per_step", False)),
        "windows_seen": stats.windows_seen,
        "lr": lrs,
        "warmup_steps": trainer.get("warmup_steps"),
        "schedule": f"{trainer.get('lr_schedule', 'cosine')} to x{trainer.get('min_lr_scale')}",
        "precision": stats.precision,
        "train_time_s": stats.wall_time_s,
        "cache_s": stats.feature_cache_s,
        "checkpoint": which,
        "counterfactual": bool(data.get("counterfactual", False)),
        "instruction_aux_weight": float(
            cfg.get("train_setup", {}).get("instruction_aux_weight", 0.0) or 0.0
        ),
        "timeline": stats.timeline,
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _values(budgets: list[dict[str, Any]], key: str) -> list[Any]:
    return sorted({repr(b.get(key)): b.get(key) for b in budgets}.values(), key=repr)


def budget_differences(a: list[dict[str, Any] | None], b: list[dict[str, Any] | None]) -> list[str]:
    """What differs between two arms' budgets (each a list over seeds) beyond the strategy:
    ``["steps 30 vs 2,000", ...]``; empty when the budgets are equal, or unknown (older
    results without budgets: ``["budgets not recorded"]``)."""
    ba, bb = [x for x in a if x], [x for x in b if x]
    if not ba or not bb or len(ba) < len(a) or len(bb) < len(b):
        return ["budgets not recorded"]
    out = []
    for key in (
        "train_episodes",
        "steps",
        "batch",
        "window",
        "per_step",
        "warmup_steps",
        "schedule",
        "checkpoint",
        "counterfactual",
        "instruction_aux_weight",
    ):
        va, vb = _values(ba, key), _values(bb, key)
        if va != vb:
            name = LABELS.get(key, key.replace("_", " "))
            out.append(f"{name} {'/'.join(map(_fmt, va))} vs {'/'.join(map(_fmt, vb))}")
    seen_a = [x.get("windows_seen") for x in ba]
    seen_b = [x.get("windows_seen") for x in bb]
    if None not in seen_a + seen_b:
        ma, mb = sum(seen_a) / len(seen_a), sum(seen_b) / len(seen_b)
        if abs(ma - mb) > 0.02 * max(ma, mb):  # epochs of per-step windows round the count
            out.append(f"supervised pairs seen {ma:,.0f} vs {mb:,.0f}")
    for group in SHARED_GROUPS:
        va = sorted({x["lr"].get(group) for x in ba if x.get("lr")} - {None})
        vb = sorted({x["lr"].get(group) for x in bb if x.get("lr")} - {None})
        if va != vb:
            out.append(
                f"{group} learning rate {'/'.join(map(_fmt, va))} vs {'/'.join(map(_fmt, vb))}"
            )
    return out


def budget_clause(a: list[dict[str, Any] | None], b: list[dict[str, Any] | None]) -> str:
    """The words a verdict between two arms carries about their budgets."""
    diff = budget_differences(a, b)
    if not diff:
        return "equal budgets (same data, steps, batch, pairs seen, schedule, checkpoint rule)"
    if diff == ["budgets not recorded"]:
        return "budgets not recorded: the arms may not be comparable"
    return "**budgets differ beyond the strategy** (" + "; ".join(diff) + ")"


def budget_row(strategy: str, budgets: list[dict[str, Any] | None], seeds: list[Any]) -> list[str]:
    """One row of the report's budget table (values shared by the seeds, or each seed's)."""
    known = [b for b in budgets if b]
    if not known:
        return [strategy, *["n/a"] * 9, ", ".join(map(str, seeds))]

    def col(key: str) -> str:
        return "/".join(_fmt(v) for v in _values(known, key))

    lrs: dict[str, set[float]] = {}
    for b in known:
        for name, lr in (b.get("lr") or {}).items():
            lrs.setdefault(name, set()).add(lr)
    lr_text = ", ".join(f"{n} {'/'.join(_fmt(v) for v in sorted(s))}" for n, s in lrs.items())
    seen = [b.get("windows_seen") for b in known]
    times = [b.get("train_time_s") for b in known]
    cache = [b.get("cache_s") for b in known]
    rule = col("checkpoint")
    return [
        strategy,
        col("train_episodes"),
        col("steps"),
        col("batch")
        + (" windows of " + col("window") + (", per step" if known[0].get("per_step") else "")),
        "n/a" if None in seen else f"{sum(seen) / len(seen):,.0f}",
        lr_text,
        f"{col('warmup_steps')} warm-up, {col('schedule')}",
        "n/a" if None in times else " / ".join(f"{t:.0f}" for t in times),
        "n/a" if None in cache else " / ".join(f"{t:.0f}" for t in cache),
        f"{rule} ({CHECKPOINT_RULES.get(rule, rule)})",
        ", ".join(map(str, seeds)),
    ]


BUDGET_HEADER = [
    "arm",
    "training episodes",
    "steps",
    "batch",
    "supervised pairs seen",
    "learning rate per group",
    "schedule",
    "training s (per seed)",
    "feature cache s",
    "checkpoint",
    "seeds",
]
