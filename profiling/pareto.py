"""Accuracy against cost: the Pareto front of backbones by latency (batch 1) and by FLOPs.

The plot shows what the tables know: each backbone's test metric with its 95% bootstrap interval,
its latency from p50 to p99, noisy latencies hollow, random weights written on the figure. Front
membership does not hinge on timing noise: two latencies within ``1 + 2 * cv`` of each other (the
larger coefficient of variation of the two) count as the same cost, and so do two backbones of the
same architecture and FLOPs unless the slower one's median lies beyond the faster one's p99.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from runtime.figures import save_png  # noqa: E402


@dataclass(frozen=True)
class ParetoPoint:
    name: str  # backbone@size
    score: float  # test metric
    ci: tuple[float, float] | None  # its 95% bootstrap interval
    p50_ms: float
    p99_ms: float
    cv: float  # of the latency runs
    noisy: bool
    gflops: float
    architecture: str  # timm model name: the same one at the same size costs the same


def pareto_front(points: Sequence[tuple[float, float]],
                 same_cost: Callable[[int, int], bool] | None = None) -> list[int]:
    """Indices of points (cost, score) that no other point dominates, sorted by cost. ``j`` dominates ``i``
    when it scores at least as well at a cost that is lower or the same (``same_cost(i, j)``: equal within
    the measurement noise), strictly better in one of the two."""
    def dominated(i: int) -> bool:
        for j in range(len(points)):
            if j == i:
                continue
            tied = same_cost(i, j) if same_cost else points[j][0] == points[i][0]
            cheaper = points[j][0] < points[i][0] and not tied
            if points[j][1] >= points[i][1] and (cheaper or (tied and points[j][1] > points[i][1])):
                return True
        return False

    return sorted((i for i in range(len(points)) if not dominated(i)), key=lambda i: (points[i][0], -points[i][1]))


def latency_tie(a: ParetoPoint, b: ParetoPoint) -> bool:
    """Same cost as far as the measurements can tell. The same architecture at the same FLOPs costs the same
    unless the timing really separates them (the slower one's median beyond the faster one's p99); other
    pairs tie when their medians are within ``1 + 2 * cv``."""
    fast, slow = (a, b) if a.p50_ms <= b.p50_ms else (b, a)
    if a.architecture == b.architecture and abs(a.gflops - b.gflops) <= 1e-9 * max(a.gflops, b.gflops, 1.0):
        return slow.p50_ms <= fast.p99_ms
    return slow.p50_ms <= (1 + 2 * max(a.cv, b.cv)) * fast.p50_ms


def _log_axis(ax: plt.Axes) -> None:
    """Log scale with a readable label at every decade and at 2x and 5x in between."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(base=10, subs=tuple(range(1, 10))))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def plot_pareto(points: Sequence[ParetoPoint], *, metric: str, latency_label: str, random_weights: bool,
                path: Path) -> Path:
    """Two panels, test ``metric`` against latency and against GFLOPs, saved to ``path``."""
    fig = pareto_figure(points, metric=metric, latency_label=latency_label, random_weights=random_weights)
    return save_png(fig, path, 120)


def pareto_figure(points: Sequence[ParetoPoint], *, metric: str, latency_label: str,
                  random_weights: bool) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.4))
    scores = [p.score for p in points]
    low = [p.score - p.ci[0] if p.ci else 0.0 for p in points]
    high = [p.ci[1] - p.score if p.ci else 0.0 for p in points]
    panels = ((axes[0], [p.p50_ms for p in points], latency_label, lambda i, j: latency_tie(points[i], points[j])),
              (axes[1], [p.gflops for p in points], "GFLOPs per image", None))
    for ax, cost, label, same_cost in panels:
        front = pareto_front(list(zip(cost, scores)), same_cost)
        spread = [p.p99_ms - p.p50_ms for p in points] if same_cost else None
        ax.errorbar(cost, scores, yerr=[low, high], xerr=[[0.0] * len(points), spread] if spread else None,
                    fmt="none", ecolor="0.55", elinewidth=1, capsize=3, zorder=2,
                    label="test 95% CI" + (" / latency p50–p99" if spread else ""))
        solid = [i for i, p in enumerate(points) if not (same_cost and p.noisy)]
        hollow = [i for i, p in enumerate(points) if same_cost and p.noisy]
        ax.scatter([cost[i] for i in solid], [scores[i] for i in solid], color="tab:blue", zorder=3)
        if hollow:
            ax.scatter([cost[i] for i in hollow], [scores[i] for i in hollow], facecolors="none",
                       edgecolors="tab:blue", zorder=3, label="noisy latency (cv above threshold)")
        ax.plot([cost[i] for i in front], [scores[i] for i in front], color="tab:red", lw=1.5, zorder=1,
                label="Pareto front")
        for i, p in enumerate(points):
            ax.annotate(p.name, (cost[i], scores[i]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        fontweight="bold" if i in front else "normal")
        _log_axis(ax)
        ax.margins(x=0.25, y=0.12)  # room for the labels
        ax.set_xlabel(label)
        ax.set_ylabel(f"test {metric}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[0].set_title(f"test {metric} against latency (batch 1)", fontsize=10)
    axes[1].set_title(f"test {metric} against compute", fontsize=10)
    if random_weights:
        fig.suptitle("RANDOM WEIGHTS (--no-pretrained): these scores say nothing about pretrained quality",
                     color="tab:red", fontsize=11, fontweight="bold")
    fig.tight_layout()
    fig.canvas.draw()  # ticks and labels as they will be saved
    return fig
