"""The study report: tables (mean +- std over seeds), data-efficiency curves, the
with/without-pretraining comparison, the representation comparison, how each strategy
drives (top-down trajectories on the same held-out scenes, a rollout strip, the
instruction-sensitivity distribution), and a statement of which strategy wins on what — and
where the difference is within noise.

Noise: for a metric measured per seed, two strategies are compared with Welch's t-test (the t
distribution, as 2-5 seeds need), the difference's 95% interval and Hedges' g; with a single
seed there is no such estimate and the statement says so. Closed-loop success pools the
episodes of all seeds and uses a two-proportion z-test (|z| > 1.96) with the difference's
Newcombe interval, and every rate carries its 95% Wilson interval.
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mobile_vla.evaluation.plots import embedded_figure, save_figure, success_errorbar
from mobile_vla.evaluation.results import OfflineMetrics, most_frequent_first, wilson_interval
from mobile_vla.io import atomic_write_json, atomic_write_text
from mobile_vla.study.budgets import BUDGET_HEADER, budget_clause, budget_row
from mobile_vla.study.cells import CellResult, StudyResults
from mobile_vla.study.paired import paired_success, paired_text

# metric name -> (getter on a cell result, higher is better, format)
Getter = Callable[[CellResult], Any]
Groups = dict[tuple[str, bool, int], list[CellResult]]


# -- the document: one list of blocks, rendered as markdown and as HTML ----------------------


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Bullets:
    lines: list[str]


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Figure:
    path: Path
    alt: str


Block = Heading | Para | Bullets | Table | Figure


def to_markdown(blocks: list[Block], out: Path) -> str:
    """The report as markdown; figures are linked relative to ``out``."""
    lines = ["# mobile-vla study report", ""]
    for b in blocks:
        if isinstance(b, Heading):
            lines += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            lines += [b.text, ""]
        elif isinstance(b, Bullets):
            lines += [f"- {line}" for line in b.lines] + [""]
        elif isinstance(b, Table):
            lines += ["| " + " | ".join(b.header) + " |", "|" + "---|" * len(b.header)]
            lines += ["| " + " | ".join(r) + " |" for r in b.rows] + [""]
        else:
            lines += [f"![{b.alt}]({b.path.relative_to(out)})", ""]
    return "\n".join(lines) + "\n"


def to_html(blocks: list[Block]) -> str:
    """The report's body as HTML, figures embedded (the page stands alone)."""
    esc = html.escape
    parts = []
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{esc(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            parts.append(f"<p>{esc(b.text)}</p>")
        elif isinstance(b, Bullets):
            items = "".join(f"<li>{esc(line).replace('**', '')}</li>" for line in b.lines)
            parts.append(f"<ul>{items}</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{esc(c)}</th>" for c in b.header)
            body = "".join(
                "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in b.rows
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:
            parts.append(embedded_figure(b.path, b.alt))
    return "\n".join(parts)


def _offline(fn: Callable[[OfflineMetrics], Any]) -> Getter:
    """A getter of an offline metric: None for a cell without offline metrics."""
    return lambda cell: fn(cell.offline) if cell.offline else None


def _rmse(dim: str) -> Getter:
    return _offline(lambda m: m.rmse.get(dim))


_val_loss = _offline(lambda m: m.val_loss)
_sensitivity = _offline(lambda m: m.instruction_sensitivity.mean_abs_diff)


def _gib(cell: CellResult) -> Any:
    b = cell.peak_memory_bytes
    return b / 2**30 if b else None


def _success(cell: CellResult) -> Any:
    return cell.closed_loop.success_rate if cell.closed_loop else None


def _side(side: str) -> Getter:
    def fn(cell: CellResult) -> Any:
        b = cell.closed_loop.side(side) if cell.closed_loop else None
        return b.success_rate if b else None

    return fn


def metric_table(dims: list[str]) -> list[tuple[str, Getter, bool, str]]:
    rows: list[tuple[str, Getter, bool, str]] = [("val_loss", _val_loss, False, "{:.4f}")]
    rows += [(f"rmse {d}", _rmse(d), False, "{:.4f}") for d in dims]
    rows += [
        (
            "direction accuracy",
            _offline(lambda m: m.direction_accuracy.value),
            True,
            "{:.3f}",
        ),
        ("instruction sensitivity", _sensitivity, True, "{:.4f}"),
        ("closed-loop success", _success, True, "{:.3f}"),
        ("success (left)", _side("left"), True, "{:.3f}"),
        ("success (right)", _side("right"), True, "{:.3f}"),
        ("trainable params", lambda c: c.trainable_params, False, "{:,.0f}"),
        ("peak memory GiB", _gib, False, "{:.2f}"),
        ("training time s", lambda c: c.train_time_s, False, "{:.0f}"),
    ]
    return rows


def _stats(values: list[Any]) -> dict[str, Any]:
    v = [float(x) for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": float(np.mean(v)),
        "std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
        "n": len(v),
    }


def _fmt(s: dict[str, Any], fmt: str) -> str:
    if s["mean"] is None:
        return "n/a"
    text = fmt.format(s["mean"])
    if s["std"] is not None:
        text += " ± " + fmt.format(s["std"])
    return text


def cell_results(results: StudyResults) -> list[CellResult]:
    return list(results.cells.values())


def groups(results: StudyResults) -> Groups:
    out: Groups = defaultdict(list)
    for cell in cell_results(results):
        out[cell.key.group].append(cell)
    return out


def pooled_success(cells: list[CellResult], side: str | None = None) -> dict[str, Any]:
    k = n = 0
    for c in cells:
        cl = c.closed_loop
        if not cl:
            continue
        b = cl.overall if side is None else cl.side(side)
        if b:
            k += b.successes
            n += b.episodes
    lo, hi = wilson_interval(k, n)
    return {"successes": k, "episodes": n, "rate": k / n if n else None, "ci95": [lo, hi]}


def pooled_failures(cells: list[CellResult]) -> dict[str, int]:
    """How the cells' closed-loop episodes failed (``ClosedLoopSummary.failures``), summed over
    the cells, most frequent first."""
    total: Counter[str] = Counter()
    for c in cells:
        total.update(c.closed_loop.failures if c.closed_loop else {})
    return most_frequent_first(total)


def _largest(sizes: list[int]) -> int:
    return 0 if 0 in sizes else max(sizes)


def headline(results: StudyResults) -> tuple[bool, int]:
    keys = [c.key for c in cell_results(results)]
    pretrained = any(k.pretrained for k in keys)
    return pretrained, _largest([k.train_episodes for k in keys])


def compare_two(
    a: list[CellResult], b: list[CellResult], getter: Getter, higher: bool
) -> dict[str, Any]:
    """Welch's t-test on the per-seed values (the t distribution: with 2-5 seeds a normal
    approximation overstates certainty), with the difference's 95% confidence interval and
    Hedges' g (the difference in pooled standard deviations, small-sample corrected)."""
    from scipy import stats as st

    va = [float(v) for v in (getter(c) for c in a) if v is not None]
    vb = [float(v) for v in (getter(c) for c in b) if v is not None]
    if not va or not vb:
        return {"verdict": "n/a"}
    diff = float(np.mean(va) - np.mean(vb))
    if len(va) < 2 or len(vb) < 2:
        return {"diff": diff, "se": None, "verdict": "no noise estimate (one seed)"}
    sa2, sb2 = np.var(va, ddof=1), np.var(vb, ddof=1)
    na, nb = len(va), len(vb)
    se = float(math.sqrt(sa2 / na + sb2 / nb))
    if se == 0.0:
        verdict = "within noise" if diff == 0 else ("a" if (diff > 0) == higher else "b")
        return {
            "diff": diff,
            "se": 0.0,
            "ci95": [diff, diff],
            "p": 0.0 if diff else 1.0,
            "df": na + nb - 2,
            "g": None,
            "verdict": verdict,
        }
    df = se**4 / ((sa2 / na) ** 2 / (na - 1) + (sb2 / nb) ** 2 / (nb - 1))
    t = diff / se
    p = float(2 * st.t.sf(abs(t), df))
    half = float(st.t.ppf(0.975, df)) * se
    pooled = math.sqrt(((na - 1) * sa2 + (nb - 1) * sb2) / (na + nb - 2))
    g = diff / pooled * (1 - 3 / (4 * (na + nb) - 9)) if pooled > 0 else None
    out = {"diff": diff, "se": se, "ci95": [diff - half, diff + half], "p": p, "df": df, "g": g}
    if p >= 0.05:
        out["verdict"] = "within noise"
    else:
        out["verdict"] = "a" if (diff > 0) == higher else "b"
    return out


def success_test(a: list[CellResult], b: list[CellResult]) -> dict[str, Any]:
    """Pooled closed-loop success of two arms: the two-proportion z-test (episodes are the
    units), the difference in success rate with its 95% Newcombe (Wilson-score) interval."""
    pa, pb = pooled_success(a), pooled_success(b)
    if not pa["episodes"] or not pb["episodes"]:
        return {"verdict": "n/a"}
    p = (pa["successes"] + pb["successes"]) / (pa["episodes"] + pb["episodes"])
    se = math.sqrt(max(p * (1 - p), 1e-12) * (1 / pa["episodes"] + 1 / pb["episodes"]))
    diff = pa["rate"] - pb["rate"]
    z = diff / se
    (la, ua), (lb, ub) = pa["ci95"], pb["ci95"]
    ci = [
        diff - math.sqrt((pa["rate"] - la) ** 2 + (ub - pb["rate"]) ** 2),
        diff + math.sqrt((ua - pa["rate"]) ** 2 + (pb["rate"] - lb) ** 2),
    ]
    verdict = "within noise" if abs(z) <= 1.96 else ("a" if z > 0 else "b")
    return {"a": pa, "b": pb, "z": z, "diff": diff, "ci95": ci, "verdict": verdict}


def _success_text(test: dict[str, Any]) -> str:
    """'k/n vs k/n, difference [95% CI], z' of a :func:`success_test`."""
    pa, pb = test["a"], test["b"]
    lo, hi = test["ci95"]
    return (
        f"{pa['successes']}/{pa['episodes']} vs {pb['successes']}/{pb['episodes']}, difference "
        f"{100 * test['diff']:+.1f} points [95% CI {100 * lo:+.1f}, {100 * hi:+.1f}], "
        f"z = {test['z']:.2f}"
    )


def _welch_text(test: dict[str, Any], fmt: str = "{:+.4g}") -> str:
    """', difference [95% CI], Welch t df, p, Hedges' g' of a :func:`compare_two` with a
    noise estimate ('' without one)."""
    if not test.get("se"):
        return ""
    lo, hi = test["ci95"]
    text = (
        f", difference {fmt.format(test['diff'])} [95% CI {fmt.format(lo)}, {fmt.format(hi)}], "
        f"Welch t df {test['df']:.1f}, p = {test['p']:.3f}"
    )
    if test.get("g") is not None:
        text += f", Hedges' g {test['g']:+.2f}"
    return text


def case3_vs_case4(g: Groups, pt: bool, size: int) -> list[str]:
    """The question the study exists for, asked directly whatever else the grid holds:
    frozen (Case 3) against LoRA (Case 4) at the headline setting, on closed-loop success
    (the same scenes for both: a bootstrap over scenes, paired, and training seeds, as
    clusters) and on instruction following (per-seed instruction sensitivity, Welch's t),
    each difference with its 95% interval and each line saying whether the budgets were
    equal."""
    a, b = g.get(("frozen", pt, size)), g.get(("lora", pt, size))
    if not a or not b:
        return []
    budgets = budget_clause([c.budget for c in a], [c.budget for c in b])
    out = []
    test = paired_success(a, b)
    if "diff" in test:
        if test["discordant"] == [0, 0]:
            why = (
                f"the arms did the same on every scene, both at {100 * test['rates'][0]:.0f}% "
                "(no discordant pair), so these scenes cannot resolve a difference"
            )
            if test["rates"] == [0.0, 0.0]:
                why += (
                    "; neither arm drives at this budget: the Case-4 recipe needs ~2,400 steps "
                    "(`mobile-vla study configs/study_case34.yaml`; README, 'Case 3 vs Case 4, "
                    "answered')"
                )
        else:
            why = (
                "this design resolves only differences beyond about "
                f"±{100 * test['half_width']:.0f} points"
            )
        verdict = {
            "a": "**Case 3 (frozen) drives better**",
            "b": "**Case 4 (LoRA) drives better**",
        }.get(test["verdict"], f"a difference is **not shown** ({why})")
        out.append(
            f"Case 3 (frozen) vs Case 4 (LoRA), closed-loop success: {verdict} "
            f"({paired_text(test)}); {budgets}."
        )
    getter = _sensitivity
    test = compare_two(a, b, getter, True)
    if "diff" in test:
        ma = _stats([getter(c) for c in a])["mean"]
        mb = _stats([getter(c) for c in b])["mean"]
        verdict = {"a": "frozen follows it more", "b": "LoRA follows it more"}.get(
            test["verdict"], "a difference is not shown"
        )
        detail = f"{ma:.4f} vs {mb:.4f} m/s" + _welch_text(test, "{:+.4f}")
        if test["verdict"].startswith("no noise"):
            detail += ", one seed: no noise estimate"
        out.append(
            f"Case 3 (frozen) vs Case 4 (LoRA), instruction following (sensitivity of the "
            f"command to swapping left and right): {verdict} ({detail}); {budgets}."
        )
    return out


def statement(results: StudyResults | dict[str, Any], dims: list[str]) -> list[str]:
    """Plain sentences: per metric, which strategy is best at the headline setting and whether
    it beats the runner-up beyond noise; then what pretraining changed."""
    results = StudyResults.of(results)
    g = groups(results)
    pt, size = headline(results)
    strategies = [s for s in results.study["strategies"] if (s, pt, size) in g]
    lines: list[str] = []
    seeds = ", ".join(f"{s} {len(g[(s, pt, size)])}" for s in strategies)
    setting = (
        f"{'pretrained' if pt else 'randomly initialised'} backbone, "
        f"{'all' if size == 0 else size} training episodes; training seeds per arm: {seeds}"
    )
    if len(strategies) >= 2:
        lines.append(f"Headline setting: {setting}.")
        for name, getter, higher, fmt in metric_table(dims):
            if name in ("success (left)", "success (right)"):
                continue
            means = {s: _stats([getter(c) for c in g[(s, pt, size)]])["mean"] for s in strategies}
            ranked = [s for s in strategies if means[s] is not None]
            if len(ranked) < 2:
                continue
            ranked.sort(key=lambda s: means[s], reverse=higher)
            best, second = ranked[0], ranked[1]
            cells_a, cells_b = g[(best, pt, size)], g[(second, pt, size)]
            budgets = budget_clause([c.budget for c in cells_a], [c.budget for c in cells_b])
            if name == "closed-loop success":
                test = success_test(cells_a, cells_b)
                detail = _success_text(test) if "z" in test else ""
            else:
                test = compare_two(cells_a, cells_b, getter, higher)
                detail = f"{fmt.format(means[best])} vs {fmt.format(means[second])}"
                detail += _welch_text(test)
            if test["verdict"] == "a":
                lines.append(
                    f"**{best}** is best on {name} ({detail}) — significant at 5%; {budgets}."
                )
            elif test["verdict"] == "within noise":
                lines.append(
                    f"{best} vs {second} on {name}: a difference is **not shown** ({detail}); "
                    f"{budgets}."
                )
            elif test["verdict"].startswith("no noise"):
                lines.append(
                    f"{best} leads on {name} ({detail}); one seed gives no noise estimate — "
                    f"add seeds before relying on it; {budgets}."
                )
    lines += case3_vs_case4(g, pt, size)
    n = size
    for s in sorted(s for (s, p, k) in g if p and k == n and (s, False, n) in g):
        for name, getter, higher, fmt in metric_table(dims):
            if name not in ("rmse all", "closed-loop success", "instruction sensitivity"):
                continue
            if name == "closed-loop success":
                test = success_test(g[(s, True, n)], g[(s, False, n)])
                if "z" not in test:
                    continue
                detail = (
                    f"{test['a']['successes']}/{test['a']['episodes']} vs "
                    f"{test['b']['successes']}/{test['b']['episodes']}"
                )
            else:
                test = compare_two(g[(s, True, n)], g[(s, False, n)], getter, higher)
                if "diff" not in test:
                    continue
                a = _stats([getter(c) for c in g[(s, True, n)]])["mean"]
                b = _stats([getter(c) for c in g[(s, False, n)]])["mean"]
                detail = f"{fmt.format(a)} vs {fmt.format(b)}"
            verdict = {
                "a": "pretraining helps",
                "b": "pretraining hurts",
                "within noise": "pretraining makes no difference that the seeds can detect",
            }.get(test["verdict"], "pretrained vs random (one seed, no noise estimate)")
            lines.append(f"{s}: {verdict} on {name} (pretrained vs random: {detail}).")
    return lines


def _plot_efficiency(results: StudyResults, out: Path, dims: list[str]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = groups(results)
    sizes = sorted({k[2] for k in g})
    if len(sizes) < 2:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    used = {c.key.train_episodes: c.train_used for c in cell_results(results)}
    for strategy, pt in sorted({(k[0], k[1]) for k in g}):
        xs, ys, es, rs, res = [], [], [], [], []
        for n in sizes:
            cells = g.get((strategy, pt, n))
            if not cells:
                continue
            xs.append(used[n])
            s = _stats([_success(c) for c in cells])
            r = _stats([_rmse("all")(c) for c in cells])
            ys.append(s["mean"] if s["mean"] is not None else np.nan)
            es.append(s["std"] or 0.0)
            rs.append(r["mean"] if r["mean"] is not None else np.nan)
            res.append(r["std"] or 0.0)
        style = "-o" if pt else "--s"
        label = f"{strategy} ({'pretrained' if pt else 'random init'})"
        axes[0].errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=label)
        axes[1].errorbar(xs, rs, yerr=res, fmt=style, capsize=3, label=label)
    axes[0].set(xlabel="training episodes", ylabel="closed-loop success", ylim=(-0.02, 1.02))
    axes[1].set(xlabel="training episodes", ylabel="validation RMSE (all dims)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("Data efficiency (mean ± std over seeds)")
    return save_figure(fig, out / "figures" / "data_efficiency.png")


def _rollout_strip(gif: Path, target: Path, frames: int = 8) -> Path | None:
    """``frames`` evenly spaced frames of a rollout GIF side by side."""
    from PIL import Image, ImageSequence

    try:
        with Image.open(gif) as im:
            seq = [f.convert("RGB") for f in ImageSequence.Iterator(im)]
    except OSError:
        return None
    if not seq:
        return None
    picks = [seq[round(i * (len(seq) - 1) / max(1, frames - 1))] for i in range(frames)]
    w, h = picks[0].size
    strip = Image.new("RGB", (w * len(picks) + 2 * (len(picks) - 1), h), "white")
    for i, frame in enumerate(picks):
        strip.paste(frame, (i * (w + 2), 0))
    target.parent.mkdir(parents=True, exist_ok=True)
    strip.save(target)
    return target


def _plot_sensitivity(cells_by_strategy: dict[str, list[CellResult]], out: Path) -> Path | None:
    """The distribution of |linear_y(instruction) - linear_y(swapped)| per strategy, pooled
    over its seeds' test windows (from each cell's histogram)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    drawn = False
    for strategy, cells in cells_by_strategy.items():
        values, weights = [], []
        for c in cells:
            hist = c.offline.instruction_sensitivity.histogram if c.offline else None
            if not hist:
                continue
            edges = np.asarray(hist.edges)
            values += list((edges[:-1] + edges[1:]) / 2)
            weights += list(hist.counts)
        if not values or not sum(weights):
            continue
        top = max(values) * 1.05 + 1e-9
        ax.hist(values, bins=20, range=(0, top), weights=weights, histtype="step",
                density=True, linewidth=1.5, label=strategy)  # fmt: skip
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="|linear_y(instruction) - linear_y(left/right swapped)| (m/s)", ylabel="density")
    ax.set_title("Instruction sensitivity, test windows, pooled over seeds", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, out / "figures" / "instruction_sensitivity.png")


def driving_section(cells_by_strategy: dict[str, list[CellResult]], out: Path) -> list[Block]:
    """How each strategy drives: its first seed's top-down trajectories on the held-out scenes
    (the same scenes for every strategy: one closed-loop seed), left and right; a strip of
    its first rollout; closed-loop success against training steps (when the study keeps
    step checkpoints); the instruction-sensitivity distribution."""
    blocks: list[Block] = []
    for strategy, cells in cells_by_strategy.items():
        run = Path(cells[0].run) / "eval"
        seed = cells[0].key.seed
        shown = []
        for side in ("left", "right"):
            src = run / f"trajectories_{side}.png"
            if src.exists():
                target = out / "figures" / f"trajectories_{strategy}_{side}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(src.read_bytes())
                shown.append(Figure(target, f"{strategy}, instructed {side} (seed {seed})"))
        gifs = sorted(run.glob("rollout_*.gif"))
        if gifs:
            strip = _rollout_strip(gifs[0], out / "figures" / f"rollout_{strategy}.png")
            if strip is not None:
                shown.append(Figure(strip, f"{strategy}: {gifs[0].stem} (seed {seed}), 8 frames"))
        if shown:
            blocks += [Heading(strategy, 3), *shown]
    for plot, alt in (
        (_plot_success_curves(cells_by_strategy, out), "closed-loop success against steps"),
        (_plot_success_vs_time(cells_by_strategy, out), "closed-loop success against seconds"),
        (_plot_sensitivity(cells_by_strategy, out), "instruction-sensitivity distribution"),
    ):
        if plot is not None:
            blocks.append(Figure(plot, alt))
    return [Heading("How each strategy drives"), *blocks] if blocks else []


def success_curves(cells: list[CellResult]) -> list[tuple[int, int, int]]:
    """(step, successes, episodes) pooled over a strategy's seeds, at the steps every seed's
    curve has (``closed_loop.curve`` of the study)."""
    per_step: dict[int, list[tuple[int, int]]] = defaultdict(list)
    curves = [c.curve.points for c in cells if c.curve]
    for points in curves:
        for p in points:
            per_step[p.step].append((p.successes, p.episodes))
    return [
        (step, sum(k for k, _ in v), sum(n for _, n in v))
        for step, v in sorted(per_step.items())
        if len(v) == len(curves)
    ]


def _plot_success_curves(cells_by_strategy: dict[str, list[CellResult]], out: Path) -> Path | None:
    """Closed-loop success against training steps per strategy, pooled over seeds, with
    95% Wilson intervals."""
    return _plot_success_against(
        cells_by_strategy,
        success_curves,
        "optimizer steps",
        "Closed-loop success against training steps, pooled over seeds",
        out / "figures" / "success_vs_steps.png",
    )


def _plot_success_against(
    cells_by_strategy: dict[str, list[CellResult]],
    points_of: Any,
    xlabel: str,
    title: str,
    path: Path,
) -> Path | None:
    """One line per arm of (x, successes, episodes) points from ``points_of(cells)``, with
    95% Wilson intervals; None when no arm has a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    drawn = False
    for strategy, cells in cells_by_strategy.items():
        points = points_of(cells)
        if not points:
            continue
        success_errorbar(
            ax,
            [x for x, _, _ in points],
            [k / n for _, k, n in points],
            [wilson_interval(k, n) for _, k, n in points],
            strategy,
        )
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel=xlabel, ylabel="closed-loop success", ylim=(-0.02, 1.02))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def seconds_at(budget: dict[str, Any] | None, step: int) -> float | None:
    """Training seconds at optimizer ``step``, interpolated on the run's timeline."""
    timeline = (budget or {}).get("timeline") or []
    if not timeline:
        return None
    steps = [0] + [int(p[0]) for p in timeline]
    secs = [0.0] + [float(p[1]) for p in timeline]
    return float(np.interp(step, steps, secs))


def success_vs_time(cells: list[CellResult]) -> list[tuple[float, int, int]]:
    """(training seconds, successes, episodes) of an arm pooled over its seeds: at each
    curve step every seed has (seconds averaged over seeds), or the evaluated checkpoint's
    single point."""
    points = []
    for step, k, n in success_curves(cells):
        secs = [seconds_at(c.budget, step) for c in cells]
        if None not in secs:
            points.append((float(np.mean(secs)), k, n))  # type: ignore[arg-type]
    if points:
        return points
    times = [c.train_time_s for c in cells]
    pooled = pooled_success(cells)
    if None in times or not pooled["episodes"]:
        return []
    return [(float(np.mean(times)), pooled["successes"], pooled["episodes"])]  # type: ignore[arg-type]


def _plot_success_vs_time(cells_by_strategy: dict[str, list[CellResult]], out: Path) -> Path | None:
    """Closed-loop success against training seconds per arm (pooled over seeds, 95% Wilson
    intervals): what each arm's compute bought."""
    return _plot_success_against(
        cells_by_strategy,
        success_vs_time,
        "training seconds (feature cache not counted)",
        "Closed-loop success against training time, pooled over seeds",
        out / "figures" / "success_vs_seconds.png",
    )


# -- the sections, top to bottom ----------------------------------------------------------------


@dataclass
class _Study:
    """What every section reads: the results, their cells grouped by (strategy, pretrained,
    episodes), the action dimensions, the headline group, and the report folder."""

    results: StudyResults
    out: Path
    g: Groups
    dims: list[str]
    pretrained: bool
    size: int
    strategies: list[str]
    summary: dict[str, Any]


def _intro(st: _Study) -> list[Block]:
    study = st.results.study
    cl = study["closed_loop"]
    return [
        Para(
            f"{len(st.results.cells)} cells: strategies {study['strategies']}, seeds "
            f"{study['seeds']}, training episodes "
            f"{[n or 'all' for n in study['train_episodes']]}, pretrained "
            f"{study['pretrained']}; base config `{st.results.base_config}`; "
            f"closed loop: {cl['episodes']} held-out episodes per cell "
            f"(seed {cl['seed']}, chunk {cl['chunk']})."
        )
    ]


def _budgets(st: _Study) -> list[Block]:
    """What every arm was given, first: a verdict means something only at equal budgets."""
    rows = []
    budgets_json: dict[str, Any] = {}
    for (strategy, pretrained, size), cells in sorted(
        st.g.items(), key=lambda x: (x[0][0], not x[0][1], x[0][2])
    ):
        name = strategy + ("" if pretrained else ", random init")
        name += f", {size} episodes" if size else ""
        seeds = [c.key.seed for c in cells]
        rows.append(budget_row(name, [c.budget for c in cells], seeds))
        budgets_json[name] = [c.budget for c in cells]
    st.summary["budgets"] = budgets_json
    return [
        Heading("Budgets"),
        Para(
            "What each arm was given. A verdict below compares like with like only where the "
            "budgets are equal but for what the strategy itself changes (which parameters "
            "train, at their own learning rates); every verdict says so in its line. "
            "Training time is the optimizer loop's (validation included); the feature cache "
            "is built before it and counted apart."
        ),
        Table(BUDGET_HEADER, rows),
    ]


def _language(st: _Study) -> list[Block]:
    """Language reliance per arm, pooled over seeds: the swap-follow score, success with the
    instruction, swapped, blank and in unseen phrasings."""
    rows = []
    out: dict[str, Any] = {}
    for s in st.strategies:
        cells = [c for c in st.g[(s, st.pretrained, st.size)] if c.language]
        if not cells:
            continue
        row = [s]
        for key in (
            "swap_follow",
            "success",
            "swapped_success",
            "blank_success",
            "paraphrase_success",
        ):
            k = sum(int(c.language[key]["successes"]) for c in cells)  # type: ignore[index]
            n = sum(int(c.language[key]["episodes"]) for c in cells)  # type: ignore[index]
            lo, hi = wilson_interval(k, n)
            out.setdefault(s, {})[key] = {"successes": k, "episodes": n, "ci95": [lo, hi]}
            row.append(f"{k}/{n} [{lo:.2f}, {hi:.2f}]")
        row.append(str(len(cells)))
        rows.append(row)
    if not rows:
        return []
    st.summary["language_reliance"] = out
    return [
        Heading("Does the policy follow the instruction? (closed loop)"),
        Para(
            "Each held-out scene driven four times: with its instruction; with left and right "
            "swapped (the language-reliance score is the share of scenes where both runs pass "
            "the obstacle on their instructed side: ~0 for a language-blind policy, ~1 for one "
            "that follows the side); with the instruction emptied; and in a phrasing no "
            "training template uses. Pooled over seeds, 95% Wilson intervals."
        ),
        Table(
            [
                "arm",
                "language reliance (swap-follow)",
                "success, instructed",
                "success, swapped",
                "success, blank",
                "success, unseen phrasing",
                "seeds",
            ],
            rows,
        ),
    ]


def _strategies_table(st: _Study) -> list[Block]:
    """Case 3 vs Case 4 (and any other strategy) on the headline group: every metric as mean
    +- std over seeds, then closed-loop success pooled over seeds with its interval."""
    cells = {s: st.g[(s, st.pretrained, st.size)] for s in st.strategies}
    rows = []
    table_json: dict[str, Any] = {}
    for name, getter, _, fmt in metric_table(st.dims):
        row = [name]
        for s in st.strategies:
            stats = _stats([getter(c) for c in cells[s]])
            table_json.setdefault(s, {})[name] = stats
            row.append(_fmt(stats, fmt))
        rows.append(row)
    for label, side in (
        ("success, pooled [95% CI]", None),
        ("success left, pooled", "left"),
        ("success right, pooled", "right"),
    ):
        row = [label]
        for s in st.strategies:
            p = pooled_success(cells[s], side)
            table_json.setdefault(s, {})[label] = p
            row.append(
                f"{p['successes']}/{p['episodes']} [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}]"
                if p["episodes"]
                else "n/a"
            )
        rows.append(row)
    row = ["failures, pooled"]
    for s in st.strategies:
        counts = pooled_failures(cells[s])
        table_json.setdefault(s, {})["failures, pooled"] = counts
        row.append(", ".join(f"{k} {n}" for k, n in counts.items()) or "none")
    rows.append(row)
    st.summary["main_table"] = table_json
    title = (
        f"Strategies ({'pretrained' if st.pretrained else 'random-init'} backbone, "
        f"{'all' if st.size == 0 else st.size} training episodes)"
    )
    return [Heading(title), Table(["metric (mean ± std over seeds)", *st.strategies], rows)]


def _statement(st: _Study) -> list[Block]:
    lines = statement(st.results, st.dims)
    st.summary["statement"] = lines
    return [Heading("What the study says"), Bullets(lines)]


def _driving(st: _Study) -> list[Block]:
    return driving_section({s: st.g[(s, st.pretrained, st.size)] for s in st.strategies}, st.out)


def _efficiency(st: _Study) -> list[Block]:
    plot = _plot_efficiency(st.results, st.out, st.dims)
    if plot is None:
        return []
    rows = []
    for (s, p, n), cells in sorted(st.g.items(), key=lambda x: (x[0][0], not x[0][1], x[0][2])):
        rows.append(
            [
                s,
                "yes" if p else "no",
                str(n or "all"),
                _fmt(_stats([_success(c) for c in cells]), "{:.3f}"),
                _fmt(_stats([_rmse("all")(c) for c in cells]), "{:.4f}"),
                _fmt(_stats([_val_loss(c) for c in cells]), "{:.4f}"),
            ]
        )
    header = ["strategy", "pretrained", "episodes", "success", "rmse all", "val_loss"]
    return [
        Heading("Data efficiency"),
        Figure(plot, "data efficiency curves"),
        Table(header, rows),
    ]


def _pretraining(st: _Study) -> list[Block]:
    pairs = sorted((s, n) for (s, p, n) in st.g if p and (s, False, n) in st.g)
    if not pairs:
        return []
    skip = ("trainable params", "peak memory GiB", "training time s")
    rows = [
        [
            s,
            str(n or "all"),
            name,
            _fmt(_stats([getter(c) for c in st.g[(s, True, n)]]), fmt),
            _fmt(_stats([getter(c) for c in st.g[(s, False, n)]]), fmt),
        ]
        for s, n in pairs
        for name, getter, _, fmt in metric_table(st.dims)
        if name not in skip
    ]
    return [
        Heading("With and without vision-language pretraining"),
        Table(["strategy", "episodes", "metric", "pretrained", "random init"], rows),
    ]


def _representations(st: _Study) -> list[Block]:
    compared = sorted(st.results.compare.items())
    if not compared:
        return []
    rows = []
    for name, c in compared:
        for space in ("context", "latent"):
            b = getattr(c, space)
            kl = b.kl
            rows.append(
                [
                    name,
                    space,
                    f"{b.cka:.4f} ({b.cka_kind})",
                    _mean(b.cosine),
                    _mean(b.euclidean),
                    f"{kl['symmetric']:.4f}"
                    if isinstance(kl, dict) and kl.get("symmetric") is not None
                    else "n/a",
                    _mean(b.correlation),
                ]
            )
    header = ["comparison", "space", "linear CKA", "cosine (paired)", "euclidean", "KL"]
    blocks: list[Block] = [
        Heading("Frozen vs LoRA: what the representations share"),
        Table([*header, "correlation"], rows),
    ]
    name, first = compared[0]
    pca = Path(first.folder) / "pca.png"
    if pca.exists():
        target = st.out / "figures" / "representations_pca.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(pca.read_bytes())
        blocks.append(Figure(target, f"PCA of context vectors ({name})"))
    return blocks


def _phases(st: _Study) -> list[Block]:
    """Where the study's time went (``results.json["phases"]``), as far as it is known when
    the report is written."""
    phases = st.results.phases
    rows = []
    if phases.get("collect") is not None:
        rows.append(["collect episodes", "", f"{phases['collect']:.0f}"])
    for cell, row in (phases.get("cells") or {}).items():
        for name, secs in row.items():
            rows.append([cell, name, f"{secs:.0f}"])
    for name, secs in (phases.get("compare") or {}).items():
        rows.append([f"compare {name}", "", f"{secs:.0f}"])
    if not rows:
        return []
    return [
        Heading("Where the time went"),
        Para(
            "Seconds per phase in the invocations that did the work (a cell's train phase holds "
            "its start-up, data loading, feature cache and training loop; the last two are also "
            "given apart). The report's own time is in results.json."
        ),
        Table(["what", "phase", "seconds"], rows),
    ]


SECTIONS = (
    _intro,
    _budgets,
    _strategies_table,
    _language,
    _statement,
    _driving,
    _efficiency,
    _pretraining,
    _representations,
    _phases,
)


def build_report(results: StudyResults | dict[str, Any], out: Path) -> dict[str, Any]:
    """The report's sections, in order, rendered as markdown and as HTML, and what the
    results file keeps of them (headline group, main table, statement)."""
    results = StudyResults.of(results)
    g = groups(results)
    first = cell_results(results)[0]
    dims = [d for d in (first.offline.rmse if first.offline else {}) if d != "all"] + ["all"]
    pt, size = headline(results)
    strategies = [s for s in results.study["strategies"] if (s, pt, size) in g]
    summary: dict[str, Any] = {"headline": {"pretrained": pt, "train_episodes": size}}
    st = _Study(results, out, g, dims, pt, size, strategies, summary)
    blocks = [block for section in SECTIONS for block in section(st)]
    summary["cells"] = len(results.cells)
    return {"markdown": to_markdown(blocks, out), "html": to_html(blocks), **summary}


def _mean(v: Any) -> str:
    if isinstance(v, dict):
        if v.get("mean") is not None:
            return f"{v['mean']:.4f}"
        if v.get("value") is not None:
            return f"{v['value']:.4f}"
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else "n/a"


def write_report(out: Path, results: StudyResults) -> None:
    """``report.md`` and ``report.html``; ``results.report`` gets the report's summary and
    ``results.json`` is rewritten with it."""
    report = build_report(results, out)
    atomic_write_text(out / "report.md", report["markdown"])
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mobile-vla study report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em auto;max-width:1150px;color:#222}}
table{{border-collapse:collapse;margin:0.5em 0 1.5em}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}th{{background:#f3f3f3}}
img{{max-width:100%}}li{{margin:0.25em 0}}</style></head><body>
<h1>mobile-vla study report</h1>
{report["html"]}
</body></html>
"""
    atomic_write_text(out / "report.html", page)
    summary = {k: v for k, v in report.items() if k not in ("markdown", "html")}
    results.report = json.loads(json.dumps(summary, default=float))
    atomic_write_json(out / "results.json", results.to_json())
