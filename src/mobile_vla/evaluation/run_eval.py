"""Evaluating a run folder: ``mobile-vla eval`` and a study cell's evaluation both call
:func:`evaluate`, which loads the run's policy once, computes the offline metrics on its test
episodes and, with ``episodes``, the closed loop, writes them to ``metrics.json`` and prints
them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobile_vla.evaluation.language import LanguageReliance, format_language, language_reliance
from mobile_vla.evaluation.results import ClosedLoopSummary, OfflineMetrics
from mobile_vla.models.runtime import FIRST, ChunkSpec

if TYPE_CHECKING:
    from mobile_vla.training.runs import Run


def evaluate(
    run: str | Path | Run,
    which: str = "best",
    episodes: int = 0,
    seed: int | None = None,
    chunk: ChunkSpec = FIRST,
    videos: int = 2,
    batch_size: int = 16,
    expert_steps: int = 0,
    progress: bool = True,
    echo: Callable[[str], Any] = print,
    language: int = 0,
) -> tuple[OfflineMetrics, ClosedLoopSummary | None]:
    """Offline metrics (and, with ``episodes`` > 0, the closed loop; with ``language`` > 0,
    the language reliance on that many held-out scenes of the same seed) of checkpoint
    ``which`` of ``run``; each printed through ``echo`` as it is done. Returns the offline
    metrics and the closed loop (None without episodes)."""
    from mobile_vla.evaluation.closed_loop import (
        development_note,
        evaluate_run_closed_loop,
        format_closed_loop,
        refuse_selection_seed,
    )
    from mobile_vla.evaluation.offline import evaluate_run, format_offline
    from mobile_vla.training.runs import Run

    run = Run.open(run)  # opened once; its policy loaded once, for every evaluation
    if episodes > 0 or language > 0:  # before anything is computed or written
        refuse_selection_seed(run, which, run.config.seed if seed is None else seed)
        note = development_note(run.config.seed if seed is None else seed)
        if note:
            echo(note)
    offline = evaluate_run(run, which, batch_size, progress)
    echo(format_offline(offline))
    closed = None
    if episodes > 0:
        closed = evaluate_run_closed_loop(
            run,
            episodes,
            seed,
            chunk,
            videos,
            which,
            progress=progress,
            expert_steps=expert_steps,
        )
        if expert_steps:
            echo(f"the expert drove the first {expert_steps} steps (a diagnostic):")
        echo(format_closed_loop(closed))
    if language > 0:
        echo(format_language(evaluate_run_language(run, language, seed, chunk, which, progress)))
    return offline, closed


def evaluate_run_language(
    run: str | Path | Run,
    scenes: int,
    seed: int | None = None,
    chunk: ChunkSpec = FIRST,
    which: str = "best",
    progress: bool = True,
) -> LanguageReliance:
    """The language reliance of checkpoint ``which`` of ``run`` on ``scenes`` held-out
    scenes (``evaluation.language``); writes ``metrics.json["language_reliance"]``."""
    from mobile_vla.models.runtime import PolicyController
    from mobile_vla.training.runs import Run

    run = Run.open(run)
    cfg = run.config
    seed = cfg.seed if seed is None else seed
    controller = PolicyController(run.policy(which), cfg, chunk)
    result = language_reliance(controller, cfg.sim, scenes, seed, progress)
    run.update_metrics("language_reliance", {**result.to_json(), "checkpoint": which})
    return result
