"""Pictures of closed-loop runs: top-down trajectory plots and rollout GIFs (PIL), and the
pieces the matplotlib figures of curves and reports share (success with its interval against
steps, saving a figure)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mobile_vla.io import atomic_path

X_RANGE = (-0.4, 2.6)
Y_RANGE = (-1.45, 1.45)
SCALE = 160  # pixels per metre


def _to_px(x: float, y: float) -> tuple[float, float]:
    # x (forward) points up the image, y (left) points left
    return ((Y_RANGE[1] - y) * SCALE, (X_RANGE[1] - x) * SCALE)


def trajectory_plot(
    results: Sequence[Any], scenarios: Sequence[Any], path: str | Path, title: str
) -> Path:
    """Every episode's path from above: green = success, red = failure; obstacles and target
    outlined in grey (one outline per episode, as layouts vary)."""
    w = int((Y_RANGE[1] - Y_RANGE[0]) * SCALE)
    h = int((X_RANGE[1] - X_RANGE[0]) * SCALE) + 24
    img = Image.new("RGB", (w, h), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    for scenario in scenarios:
        for b in scenario.boxes:
            x0, y0 = _to_px(b.x + b.hx, b.y + b.hy)
            x1, y1 = _to_px(b.x - b.hx, b.y - b.hy)
            draw.rectangle([x0, y0, x1, y1], outline=(150, 150, 150))
        tx, ty = _to_px(scenario.target_x, scenario.target_y)
        draw.ellipse([tx - 4, ty - 4, tx + 4, ty + 4], outline=(90, 90, 200))
    for r in results:
        pts = [_to_px(x, y) for x, y, _ in r.trajectory]
        colour = (30, 160, 60) if r.success else (210, 50, 40)
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
    sx, sy = _to_px(0.0, 0.0)
    draw.rectangle([sx - 5, sy - 5, sx + 5, sy + 5], outline=(0, 0, 0))
    ok = sum(r.success for r in results)
    draw.text((6, h - 20), f"{title}: {ok}/{len(results)} successful (green)", fill=(0, 0, 0))
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def rollout_gif(frames: Sequence[np.ndarray], path: str | Path, fps: float = 10.0) -> Path:
    images = [Image.fromarray(np.asarray(f)) for f in frames]
    with atomic_path(path, suffix=".gif") as tmp:
        images[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=int(1000 / fps),
            loop=0,
        )
    return Path(path)


def success_errorbar(
    ax: Any,
    steps: Sequence[int],
    rates: Sequence[float],
    intervals: Sequence[Sequence[float]],
    label: str,
) -> None:
    """Success rates against training steps on ``ax``, each with its 95% interval (lo, hi)
    as an asymmetric error bar."""
    err = [
        [r - lo for r, (lo, _) in zip(rates, intervals, strict=True)],
        [hi - r for r, (_, hi) in zip(rates, intervals, strict=True)],
    ]
    ax.errorbar(steps, rates, yerr=err, marker="o", capsize=3, label=label)


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write (parent folders made) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def embedded_figure(path: Path, alt: str) -> str:
    """A PNG as an HTML ``<figure>`` with the image inline (base64), so a page stands alone."""
    import base64
    import html

    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'
