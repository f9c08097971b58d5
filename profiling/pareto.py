"""Accuracy against cost: the Pareto front of backbones by latency (batch 1) and by FLOPs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated by another (lower cost and higher score), sorted by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(names: Sequence[str], scores: Sequence[float], latency_ms: Sequence[float], gflops: Sequence[float],
                *, metric_label: str, latency_label: str, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, cost, label in ((axes[0], latency_ms, latency_label), (axes[1], gflops, "GFLOPs per image")):
        pts = list(zip(cost, scores))
        front = pareto_front(pts)
        ax.scatter(cost, scores, color="tab:blue", zorder=3)
        ax.plot([cost[i] for i in front], [scores[i] for i in front], color="tab:red", lw=1.5, zorder=2,
                label="Pareto front")
        for i, name in enumerate(names):
            ax.annotate(name, (cost[i], scores[i]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        fontweight="bold" if i in front else "normal")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.margins(x=0.25, y=0.12)  # room for the labels
        ax.set_xlabel(label)
        ax.set_ylabel(metric_label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[0].set_title("accuracy against latency (batch 1)", fontsize=10)
    axes[1].set_title("accuracy against compute", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
