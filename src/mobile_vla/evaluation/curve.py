"""Learning curves: closed-loop success of a run's checkpoints against training steps.

A run trained with ``trainer.checkpoint_steps`` keeps ``checkpoints/step_N`` beside ``last``;
:func:`evaluate_curve` drives every one of them through the same held-out scenarios (one
seed, so the points differ only by the weights) and records success with its Wilson interval,
per side, and the collision rate, in ``metrics.json["curve"]`` and ``RUN/eval/curve.png``.
Offline loss falls long after driving stops improving (and the other way round), so the
curve is what says whether a budget was enough.

Closed-loop success also moves between neighbouring checkpoints by more than the validation
loss says (the recipe's run: 133, 139, 127, 134 and 131 of 144 validation scenes at steps
2,000 to 6,000, the validation loss within 3% from step 3,500). :func:`select_checkpoint`
(``curve --select``) copies the checkpoint that drove best on the curve's scenes to
``checkpoints/selected``, recording the seed it was chosen on; ``eval --checkpoint selected``
refuses that seed, so the reported figure is always on other held-out scenes (select on
validation, report on test).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobile_vla.errors import MobileVLAError
from mobile_vla.evaluation.closed_loop import closed_loop
from mobile_vla.evaluation.plots import save_figure, success_errorbar
from mobile_vla.evaluation.results import CurvePoint, LearningCurve
from mobile_vla.models.runtime import FIRST, ChunkSpec, PolicyController
from mobile_vla.training.checkpoint import SELECTED, load_folder, save_folder

if TYPE_CHECKING:
    from mobile_vla.training.runs import Run


def curve_points(run: Run) -> list[tuple[str, int]]:
    """(checkpoint name, optimizer step) of every step checkpoint and ``last``."""
    from mobile_vla.training.checkpoint import saved_step

    points = [(p.name, int(p.name[5:])) for p in run.step_checkpoints()]
    last = run.path / "checkpoints" / "last"
    if last.exists():
        step = saved_step(last)  # the JSON part only; the weights are loaded once, below
        if not points or step > points[-1][1]:
            points.append(("last", step))
    if not points:
        raise MobileVLAError(f"run folder '{run}' has no checkpoints to draw a curve from")
    return points


def evaluate_curve(
    run: str | Path | Run,
    episodes: int,
    seed: int | None = None,
    chunk: ChunkSpec = FIRST,
    progress: bool = False,
) -> LearningCurve:
    """Closed-loop success of each checkpoint on the same ``episodes`` held-out scenarios."""
    from mobile_vla.training.runs import Run

    run = Run.open(run)
    cfg = run.config
    used_seed = cfg.seed if seed is None else seed
    points = []
    for name, step in curve_points(run):
        controller = PolicyController(run.policy(name), cfg, chunk)
        summary, _ = closed_loop(controller, cfg.sim, episodes, used_seed, progress=progress)
        points.append(CurvePoint(name, step, summary.overall, summary.by_side))
    curve = LearningCurve(used_seed, episodes, chunk.mode, points)
    plot_curve(curve, run.path / "eval" / "curve.png", run.name)
    run.update_metrics("curve", curve.to_json())
    return curve


def select_checkpoint(run: str | Path | Run, curve: LearningCurve) -> dict[str, Any]:
    """The curve's checkpoint with the most successes (ties: fewer collisions, then the
    earlier step), copied to ``checkpoints/selected`` with how it was chosen."""
    folder = Path(run) / "checkpoints"
    best = max(curve.points, key=lambda p: (p.successes, -(p.collision_rate or 0.0), -p.step))
    info = {
        "checkpoint": best.checkpoint,
        "step": best.step,
        "seed": curve.seed,
        "episodes": curve.episodes,
        "successes": best.successes,
        "chunk_mode": curve.chunk_mode,
    }
    state = load_folder(folder / best.checkpoint)
    state[SELECTED] = info
    save_folder(state, folder / SELECTED)
    return info


def plot_curve(curve: LearningCurve, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = curve.points
    steps = [r.step for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    success_errorbar(
        ax,
        steps,
        [r.success_rate for r in rows],
        [r.success_ci95 for r in rows],
        "success (95% Wilson)",
    )
    for side, style in (("left", "--"), ("right", ":")):
        ys = [r.by_side[side].success_rate if side in r.by_side else None for r in rows]
        if any(y is not None for y in ys):
            ax.plot(steps, ys, style, marker=".", label=side)
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("closed-loop success")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{title}: {curve.episodes} held-out scenes per point")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def format_curve(c: LearningCurve) -> str:
    lines = [
        f"closed-loop success against training steps ({c.episodes} held-out episodes per "
        f"checkpoint, seed {c.seed}, chunk {c.chunk_mode}):",
        f"  {'checkpoint':<12} {'step':>7} {'success':>9} {'95% CI':>14} {'left':>7} "
        f"{'right':>7} {'collisions':>10}",
    ]
    for r in c.points:
        lo, hi = r.success_ci95
        sides = " ".join(
            f"{r.by_side[s].successes:>3}/{r.by_side[s].episodes:<3}"
            if s in r.by_side
            else f"{0:>3}/{0:<3}"
            for s in ("left", "right")
        )
        lines.append(
            f"  {r.checkpoint:<12} {r.step:>7} {r.successes:>4}/{r.episodes:<4} "
            f"[{lo:.2f}, {hi:.2f}]  {sides} {r.collision_rate or 0.0:>10.2f}"
        )
    return "\n".join(lines)
