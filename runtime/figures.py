"""Writing a matplotlib figure to a PNG file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.files import atomic_file


def save_png(fig: Any, path: Path, dpi: int) -> Path:
    """Write ``fig`` (a laid-out matplotlib figure) to ``path`` as PNG, making its folder, and close it: ``path`` is
    the old file or the complete new one."""
    import matplotlib.pyplot as plt  # loaded already by whoever drew the figure

    # tight_layout leaves a placeholder layout engine behind, and with any engine set savefig lays the whole figure
    # out once more before drawing it: the same PNG bytes, 10-40% longer (the probe's three confusion matrices
    # 0.6 s against 0.35 s).
    fig.set_layout_engine(None)
    try:
        with atomic_file(path, "wb") as fh:  # a failed write (a full disk) leaves no half-written image behind
            fig.savefig(fh, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return path
