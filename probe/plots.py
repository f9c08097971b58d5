"""Figures of the probe: confusion matrices, alone and side by side for the top backbones."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from runtime.figures import save_png  # noqa: E402


def _draw(ax, cm: np.ndarray, classes: Sequence[str], title: str) -> None:
    cm = np.asarray(cm, dtype=float)
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)  # recall per true class
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ticks = np.arange(len(classes))
    small = len(classes) <= 20
    ax.set_xticks(ticks if small else [])
    ax.set_yticks(ticks if small else [])
    if small:
        ax.set_xticklabels(classes, rotation=90, fontsize=7)
        ax.set_yticklabels(classes, fontsize=7)
        if len(classes) <= 12:
            for i in range(len(classes)):
                for j in range(len(classes)):
                    # zeros too: an empty cell (a diagonal one above all) is a finding, not a gap
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6, in_layout=False,
                            color="white" if rows[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("true", fontsize=8)


def _save(fig, path: Path, dpi: int, random_weights: bool = False) -> Path:
    if random_weights:  # said on the figure itself: a PNG travels without its table
        fig.suptitle("RANDOM WEIGHTS (--no-pretrained)", color="tab:red", fontsize=9, fontweight="bold")
    fig.tight_layout()
    return save_png(fig, path, dpi)


def plot_confusion(cm: np.ndarray, classes: Sequence[str], title: str, path: Path,
                   random_weights: bool = False) -> Path:
    size = max(4.0, 0.35 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    _draw(ax, cm, classes, title)
    return _save(fig, path, 120, random_weights)


def plot_confusion_grid(items: Sequence[tuple[str, np.ndarray]], classes: Sequence[str], path: Path,
                        random_weights: bool = False) -> Path:
    """Test confusion matrices of several backbones side by side (colour: recall per true class)."""
    n = len(items)
    size = max(3.5, 0.3 * len(classes) + 1.5)
    fig, axes = plt.subplots(1, n, figsize=(size * n, size + 0.4), squeeze=False)
    for ax, (title, cm) in zip(axes[0], items):
        _draw(ax, cm, classes, title)
    return _save(fig, path, 110, random_weights)
