"""Closed-loop success of two arms driven on the same scenes: a paired test with seeds as
clusters.

Every cell of a study drives the same held-out scenes (one closed-loop seed). Two arms'
episodes are therefore paired by scene, and an arm's seeds are clusters: the episodes of one
training seed share its weights, so they are not independent draws. The two-proportion
z-test treats every episode as an independent unit and ignores the pairing; the cluster
bootstrap here resamples scenes (the same draw for both arms: paired) and, within each arm,
training seeds, and gives the difference in success rate with its 95% percentile interval.
An interval that includes 0 says the difference is **not shown** by this design, and its
half-width says how large a difference the design could have shown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mobile_vla.study.cells import CellResult


def scene_matrix(cells: list[CellResult]) -> tuple[np.ndarray, list[int], int | None]:
    """(seeds x scenes) 0/1 success matrix over the scene indices every cell drove, those
    indices, and the closed-loop seed the cells share (None when they differ or are
    missing: no pairing)."""
    rows: list[dict[int, bool]] = []
    seeds = set()
    for c in cells:
        cl = c.closed_loop
        if not cl or not cl.episodes_detail:
            return np.zeros((0, 0)), [], None
        seeds.add(cl.seed)
        rows.append({int(e["index"]): bool(e["success"]) for e in cl.episodes_detail})
    if len(seeds) != 1:
        return np.zeros((0, 0)), [], None
    common = sorted(set.intersection(*(set(r) for r in rows))) if rows else []
    matrix = np.array([[r[i] for i in common] for r in rows], dtype=np.float64)
    return matrix, common, seeds.pop()


def paired_success(
    a: list[CellResult], b: list[CellResult], resamples: int = 4000, seed: int = 0
) -> dict[str, Any]:
    """Difference in success rate (a - b) on the scenes both arms drove, with the 95%
    interval of a bootstrap over scenes (paired) and seeds (clusters, within each arm)."""
    ma, scenes_a, sa = scene_matrix(a)
    mb, scenes_b, sb = scene_matrix(b)
    if sa is None or sb is None or sa != sb or scenes_a != scenes_b or not scenes_a:
        return {"verdict": "n/a", "why": "the arms did not drive the same recorded scenes"}
    return {**paired_matrices(ma, mb, resamples, seed), "closed_loop_seed": sa}


def paired_matrices(
    ma: np.ndarray, mb: np.ndarray, resamples: int = 4000, seed: int = 0
) -> dict[str, Any]:
    """:func:`paired_success` on two (training seeds x scenes) 0/1 matrices whose columns are
    the same scenes."""
    if ma.ndim != 2 or mb.ndim != 2 or ma.shape[1] != mb.shape[1] or not ma.size or not mb.size:
        raise ValueError(
            f"need two (seeds x scenes) matrices on the same scenes, got {ma.shape} and {mb.shape}"
        )
    n = ma.shape[1]
    rng = np.random.default_rng(seed)
    scene_draw = rng.integers(0, n, (resamples, n))
    seeds_a = rng.integers(0, len(ma), (resamples, len(ma)))
    seeds_b = rng.integers(0, len(mb), (resamples, len(mb)))

    def arm(m: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        picked = m[seeds]  # (R, S, n)
        return np.take_along_axis(picked, scene_draw[:, None, :], axis=2).mean(axis=(1, 2))

    diffs = arm(ma, seeds_a) - arm(mb, seeds_b)
    diff = float(ma.mean() - mb.mean())
    lo, hi = (float(x) for x in np.percentile(diffs, [2.5, 97.5]))
    verdict = "a" if lo > 0 else "b" if hi < 0 else "not shown"
    # discordant scene pairs, pooled over seeds (what McNemar would count)
    both = min(len(ma), len(mb))
    a_only = int(((ma[:both] == 1) & (mb[:both] == 0)).sum())
    b_only = int(((ma[:both] == 0) & (mb[:both] == 1)).sum())
    return {
        "diff": diff,
        "ci95": [lo, hi],
        "half_width": (hi - lo) / 2,
        "verdict": verdict,
        "scenes": n,
        "seeds": [len(ma), len(mb)],
        "rates": [float(ma.mean()), float(mb.mean())],
        "discordant": [a_only, b_only],
        "resamples": resamples,
    }


def eval_matrix(groups: list[list[Path]]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(training runs x scenes) 0/1 success from ``mobile-vla eval`` metrics files: one group
    of files per training run (its evaluations on one or more closed-loop seeds); a scene is
    (closed-loop seed, episode index), and only scenes every run drove are kept."""
    rows: list[dict[tuple[int, int], bool]] = []
    for files in groups:
        row: dict[tuple[int, int], bool] = {}
        for f in files:
            try:
                cl = json.loads(Path(f).read_text())["closed_loop"]
                for e in cl["episodes_detail"]:
                    row[(int(cl["seed"]), int(e["index"]))] = bool(e["success"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{f}: expected the metrics.json of `mobile-vla eval --episodes N` (a "
                    f"closed_loop with seed and episodes_detail): {type(err).__name__}: {err}"
                ) from err
        rows.append(row)
    common = sorted(set.intersection(*(set(r) for r in rows))) if rows else []
    if not common:
        raise ValueError("the runs' evaluations share no scene (closed-loop seed and index)")
    return np.array([[r[k] for k in common] for r in rows], dtype=np.float64), common


def main(argv: list[str] | None = None) -> int:
    """``python -m mobile_vla.study.paired --a RUN1.json,RUN1b.json RUN2.json --b ...``: the
    paired cluster bootstrap on the metrics files of ``mobile-vla eval`` (each argument one
    training run; comma-separated files are that run's evaluations on several seeds)."""
    parser = argparse.ArgumentParser(prog="python -m mobile_vla.study.paired")
    parser.add_argument("--a", nargs="+", required=True, help="arm A: one argument per run")
    parser.add_argument("--b", nargs="+", required=True, help="arm B: one argument per run")
    parser.add_argument("--resamples", type=int, default=4000)
    args = parser.parse_args(argv)

    def groups(arm: list[str]) -> list[list[Path]]:
        return [[Path(p) for p in item.split(",") if p] for item in arm]

    try:
        ma, scenes = eval_matrix(groups(args.a))
        mb, scenes_b = eval_matrix(groups(args.b))
        keep = sorted(set(scenes) & set(scenes_b))
        if not keep:
            raise ValueError("arms A and B share no scene (closed-loop seed and index)")
        ia = [scenes.index(k) for k in keep]
        ib = [scenes_b.index(k) for k in keep]
        test = paired_matrices(ma[:, ia], mb[:, ib], args.resamples)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seeds = sorted({k[0] for k in keep})
    print(
        f"closed-loop seeds {seeds}: A - B = {paired_text(test)}; verdict: "
        f"{ {'a': 'A better', 'b': 'B better'}.get(test['verdict'], 'not shown') }"
    )
    return 0


def paired_text(test: dict[str, Any]) -> str:
    """'rate vs rate on n scenes x seeds, difference [95% CI]' of :func:`paired_success`."""
    lo, hi = test["ci95"]
    ra, rb = test["rates"]
    return (
        f"{100 * ra:.1f}% vs {100 * rb:.1f}% on the same {test['scenes']} scenes "
        f"({test['seeds'][0]} and {test['seeds'][1]} training seeds), difference "
        f"{100 * test['diff']:+.1f} points [95% CI {100 * lo:+.1f}, {100 * hi:+.1f}; bootstrap "
        f"over scenes, paired, and seeds], discordant scene pairs {test['discordant'][0]} / "
        f"{test['discordant'][1]}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
