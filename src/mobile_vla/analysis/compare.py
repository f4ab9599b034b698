"""``mobile-vla compare RUN_A RUN_B``: what two trained policies compute on the same inputs.

Both runs see the same windows (run A's validation episodes, or ``--data DIR``): the context
vector of the current frame (the action-token hidden states handed to the head) and the head's
latent state (h_n of the LSTM's last layer). The measures of ``shared/specs/metrics.md`` are
computed on both, and 2-D PCA and t-SNE projections of the two models' context vectors are
plotted, coloured by instruction side and by model. Written to ``OUT/``: ``compare.json``,
``pca.png``, ``tsne.png``, ``compare.html``.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobile_vla.analysis.representations import compare_features, pca_2d
from mobile_vla.errors import MobileVLAError
from mobile_vla.evaluation.plots import embedded_figure
from mobile_vla.io import atomic_path, atomic_write_json, atomic_write_text

TSNE_PERPLEXITY = 30.0
TSNE_SEED = 0


@torch.no_grad()
def representations(
    policy: Any, dataset: Any, limit: int, batch_size: int = 16
) -> dict[str, np.ndarray]:
    """Context vectors of each sample's current frame, head latents, and the side."""
    from torch.utils.data import DataLoader

    from mobile_vla.training.common import collate

    policy.eval()
    ctx, lat, side = [], [], []
    idx = np.linspace(0, len(dataset) - 1, min(limit, len(dataset))).round().astype(int)
    subset = torch.utils.data.Subset(dataset, np.unique(idx).tolist())
    for batch in DataLoader(subset, batch_size=batch_size, collate_fn=collate):
        feats, mask = policy.window_features(
            batch["images"], batch["instruction"], batch["obs_mask"], batch.get("frame_id")
        )
        out = policy.head_forward(feats, mask)
        ctx.append(feats[:, -1].float().numpy())
        lat.append(out.latent.float().numpy())
        side.append(batch["side"].numpy())
    return {
        "context": np.concatenate(ctx),
        "latent": np.concatenate(lat),
        "side": np.concatenate(side),
    }


def _scatter(points: dict[str, np.ndarray], sides: np.ndarray, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    markers = {"A": "o", "B": "^"}
    colours = {1: "#1f77b4", -1: "#d62728", 0: "#7f7f7f"}
    names = {1: "left", -1: "right", 0: "none"}
    for model, pts in points.items():
        for s in (1, -1, 0):
            sel = sides == s
            if sel.any():
                axes[0].scatter(
                    pts[sel, 0],
                    pts[sel, 1],
                    s=10,
                    c=colours[s],
                    marker=markers[model],
                    alpha=0.6,
                    label=f"{model}: {names[s]}",
                )
        axes[1].scatter(
            pts[:, 0], pts[:, 1], s=10, marker=markers[model], alpha=0.6, label=f"model {model}"
        )
    axes[0].set_title("coloured by instruction side")
    axes[1].set_title("coloured by model")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def projections(a: np.ndarray, b: np.ndarray, sides: np.ndarray, out: Path) -> dict[str, str]:
    """PCA and t-SNE of both models' context vectors. Models of different widths are each
    projected to their own leading 32 PCA components first (joint t-SNE needs one space)."""
    from sklearn.manifold import TSNE

    def reduce(x: np.ndarray) -> np.ndarray:
        xc = x - x.mean(0)
        _, _, vt = np.linalg.svd(xc, full_matrices=False)
        k = min(32, vt.shape[0])
        z = xc @ vt[:k].T
        return np.pad(z, ((0, 0), (0, 32 - k)))

    joint = (
        np.concatenate([a, b])
        if a.shape[1] == b.shape[1]
        else np.concatenate([reduce(a), reduce(b)])
    )
    n = len(a)
    pca = pca_2d(joint)
    _scatter(
        {"A": pca[:n], "B": pca[n:]}, sides, "PCA of context vectors (joint basis)", out / "pca.png"
    )
    perplexity = min(TSNE_PERPLEXITY, max(2.0, (len(joint) - 1) / 3))
    tsne = TSNE(
        n_components=2, perplexity=perplexity, random_state=TSNE_SEED, init="pca"
    ).fit_transform(joint)
    _scatter(
        {"A": tsne[:n], "B": tsne[n:]},
        sides,
        f"t-SNE of context vectors (perplexity {perplexity:g}, seed {TSNE_SEED})",
        out / "tsne.png",
    )
    return {
        "pca": "pca.png",
        "tsne": "tsne.png",
        "tsne_perplexity": perplexity,
        "tsne_seed": TSNE_SEED,
    }


def compare_runs(
    run_a: str | Path,
    run_b: str | Path,
    out: str | Path,
    data: str | Path | None = None,
    samples: int = 256,
) -> dict[str, Any]:
    from mobile_vla.data.dataset import EpisodeDataset, make_frame_source
    from mobile_vla.data.episodes import load_episodes
    from mobile_vla.training.runs import Run

    opened_a, opened_b = Run.open(run_a), Run.open(run_b)
    policy_a, cfg_a = opened_a.policy(), opened_a.config
    policy_b, cfg_b = opened_b.policy(), opened_b.config
    if list(cfg_a.data.action_dims) != list(cfg_b.data.action_dims):
        raise MobileVLAError(
            f"runs predict different action spaces: {run_a} {cfg_a.data.action_dims} vs "
            f"{run_b} {cfg_b.data.action_dims}; compare needs the same action dimensions"
        )
    if data is not None:
        data_cfg = cfg_a.data
        data_cfg.path = str(data)
        episodes = load_episodes(data_cfg)
    else:
        episodes = opened_a.episodes()
    reps = {}
    for name, policy, cfg in (("A", policy_a, cfg_a), ("B", policy_b, cfg_b)):
        # the same windows for both; each model sees them at its own window size / resolution
        ds = EpisodeDataset(
            episodes, cfg.data, policy.normalizer, False, cfg.seed, make_frame_source(cfg.data)
        )
        reps[name] = representations(policy, ds, samples)
    if len(reps["A"]["context"]) != len(reps["B"]["context"]):
        raise MobileVLAError(
            "the two runs cut the episodes into different samples "
            "(chunk_offset differs); compare needs paired inputs"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "run_a": str(run_a),
        "run_b": str(run_b),
        "strategy_a": cfg_a.train_setup.strategy,
        "strategy_b": cfg_b.train_setup.strategy,
        "inputs": {
            "episodes": len(episodes),
            "samples": len(reps["A"]["context"]),
            "source": str(data) if data is not None else f"validation split of {run_a}",
        },
        "context": compare_features(reps["A"]["context"], reps["B"]["context"]),
        "latent": compare_features(reps["A"]["latent"], reps["B"]["latent"]),
    }
    result["plots"] = projections(
        reps["A"]["context"], reps["B"]["context"], reps["A"]["side"], out
    )
    atomic_write_json(out / "compare.json", result)
    atomic_write_text(out / "compare.html", render_html(result, out))
    return result


def _fmt(block: dict[str, Any], key: str) -> str:
    v = block.get(key)
    if isinstance(v, dict):
        if v.get("value") is None and "reason" in v:
            return f"n/a ({html.escape(v['reason'])})"
        if "mean" in v:
            return f"{v['mean']:.4f} ± {v['std']:.4f} (median {v['median']:.4f})"
        if "symmetric" in v:
            return (
                f"{v['symmetric']:.4f} (A‖B {v['kl_a_b']:.4f}, B‖A {v['kl_b_a']:.4f}; "
                f"softmax over features, T={v['temperature']:g})"
            )
        if "value" in v:
            return f"{v['value']:.4f}" if v["value"] is not None else "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(str(v))


def render_html(result: dict[str, Any], out: Path) -> str:
    """A self-contained page (images embedded)."""
    rows = []
    for space in ("context", "latent"):
        b = result[space]
        rows.append(
            f"<tr><td>{space}</td><td>{b['dims'][0]} / {b['dims'][1]}</td>"
            f"<td>{b['cka']:.4f} ({html.escape(b['cka_kind'])})</td>"
            f"<td>{_fmt(b, 'cosine')}</td><td>{_fmt(b, 'euclidean')}</td>"
            f"<td>{_fmt(b, 'euclidean_standardized')}</td><td>{_fmt(b, 'kl')}</td>"
            f"<td>{_fmt(b, 'correlation')}</td></tr>"
        )
    imgs = "".join(embedded_figure(out / name, name) for name in ("pca.png", "tsne.png"))
    inp = result["inputs"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mobile-vla compare</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}}
img{{max-width:100%}}</style></head><body>
<h1>Representation comparison</h1>
<p>A: {html.escape(result["run_a"])} ({html.escape(result["strategy_a"])}) &mdash;
B: {html.escape(result["run_b"])} ({html.escape(result["strategy_b"])})<br>
Inputs: {inp["samples"]} windows from {inp["episodes"]} episodes
({html.escape(inp["source"])}), paired by input.</p>
<table><tr><th>space</th><th>dims A / B</th><th>CKA</th><th>cosine (paired)</th>
<th>euclidean</th><th>euclidean, standardized</th><th>symmetric KL</th>
<th>correlation of mean features</th></tr>{"".join(rows)}</table>
<p>Context = the action-token hidden states of the current frame; latent = the head's final
hidden state (h_n of the LSTM's last layer). Raw cosine and distances depend on each model's
basis; CKA is rotation-invariant.</p>
{imgs}
</body></html>
"""
