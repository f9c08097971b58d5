"""The probe's published results, ``WORKDIR/probe/results.json``: read by the leaderboard refresh and by stage two.

Light on purpose (no torch, no scikit-learn): a command checks it before loading anything heavy, so a workdir
without results is a one-line answer at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cache import CacheError


def read_results(workdir: str | Path, then: str) -> dict[str, Any]:
    """``probe/results.json`` of ``workdir``; a CacheError that ends with ``then`` (what to run) when it is missing."""
    path = Path(workdir) / "probe" / "results.json"
    if not path.is_file():
        raise CacheError(f"{path}: no probe results yet. {then}")
    return json.loads(path.read_text())


def stage_one_results(workdir: str | Path) -> dict[str, Any]:
    """What stage two starts from: :func:`read_results`, with the error a fine-tune needs."""
    return read_results(workdir, f"Run `python -m probe --grid --workdir {workdir}` first: stage two starts from "
                                 "the heads stage one chose.")
