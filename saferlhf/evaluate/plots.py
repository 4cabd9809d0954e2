"""Plots of a policy evaluation (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path


def plot_policy_means(
    points: Mapping[str, tuple[float, float]],
    path: str | Path,
    xlabel: str,
    ylabel: str,
    title: str,
    baseline: str | None = None,
) -> Path | None:
    """A scatter of each policy's mean (x, y), labelled by name, the baseline drawn apart.

    Nothing is drawn (None) when no policy has both values.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = {n: (x, y) for n, (x, y) in points.items() if math.isfinite(x) and math.isfinite(y)}
    if not finite:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, (x, y) in finite.items():
        is_baseline = name == baseline
        ax.scatter(x, y, s=80, marker="s" if is_baseline else "o", zorder=3)
        label = f"{name} (baseline)" if is_baseline else name
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.margins(0.2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
