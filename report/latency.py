"""Each backbone's deployment latency as the leaderboards show it, read from ``profiling/performance.json``.

The probe's ``leaderboard.md`` and the report's table read it here, so both show the same number: per backbone and
size, the smallest batch profiled (the batch of the Pareto plot), and at that batch the fastest record (the
fastest engine, where several were timed). A record without a numeric p50 and FLOPs is skipped, not an error: the
file may come from another version or a hand edit, and a leaderboard without one latency is still a leaderboard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_latency(workdir: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """The shown profiling record per (backbone, image size); empty where profiling has not run (or its file is
    unreadable). Each record carries at least ``batch_size``, ``p50_ms`` and ``gflops``, as numbers."""
    try:
        report = json.loads((Path(workdir) / "profiling" / "performance.json").read_text())
    except (OSError, ValueError):
        return {}
    records = report.get("records", []) if isinstance(report, dict) else report
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for r in records if isinstance(records, list) else []:
        try:
            key = (str(r["backbone"]), int(r["image_size"]))
            r = {**r, "batch_size": int(r.get("batch_size", 1)), "p50_ms": float(r["p50_ms"]),
                 "gflops": float(r["gflops"])}
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
        if key not in out or (r["batch_size"], r["p50_ms"]) < (out[key]["batch_size"], out[key]["p50_ms"]):
            out[key] = r
    return out


def latency_label(latency: dict[tuple[str, int], dict[str, Any]]) -> str:
    """The column's batch: "b=1", or every batch shown where they differ between backbones."""
    batches = sorted({r["batch_size"] for r in latency.values()})
    return f"b={'/'.join(map(str, batches))}" if batches else "b=1"
