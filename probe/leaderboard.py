"""Ranking backbones: sort by the validation metric, mark statistical ties, write the table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from probe.metrics import METRICS
from report.latency import latency_label


def selection_score(entry: dict[str, Any], metric: str) -> float:
    """What ranks a backbone: the score that chose its head — the cross-validated mean where ``--folds`` ran, else
    the validation ``metric``. Never test."""
    cv = entry.get("cv")
    return cv["mean"] if cv else entry["val"][metric]


def ranked_by(entries: list[dict[str, Any]], metric: str) -> str:
    """:func:`selection_score` in words, for the leaderboards' headers."""
    folds = next((e["cv"]["folds"] for e in entries if e.get("cv")), None)
    return f"{folds}-fold cross-validated {metric} (over train + val)" if folds else f"validation {metric}"


def mark_ties(entries: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Sort by :func:`selection_score` and flag test CIs overlapping the top one's."""
    higher = METRICS[metric]
    ranked = sorted(entries, key=lambda e: (-selection_score(e, metric) if higher else selection_score(e, metric),
                                            e["backbone"], e["image_size"]))
    if not ranked:
        return ranked
    lo0, hi0 = ranked[0]["test_ci"][metric]
    for rank, e in enumerate(ranked, start=1):
        lo, hi = e["test_ci"][metric]
        e["rank"] = rank
        e["tied_with_best"] = rank > 1 and not (math.isnan(lo) or math.isnan(lo0)) and lo <= hi0 and lo0 <= hi
    return ranked


def fmt_number(v: float | None, digits: int = 4) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _gap(val: float | None, test: float | None) -> str:
    if val is None or test is None or math.isnan(val) or math.isnan(test):
        return ""
    return f"{val - test:+.3f}"


def leaderboard_rows(ranked: Sequence[dict[str, Any]], metric: str,
                     latency: dict[tuple[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """The leaderboard's rows; ``latency`` is :func:`report.latency.read_latency` of the workdir."""
    rows = []
    for e in ranked:
        lo, hi = e["test_ci"][metric]
        row = {
            "rank": e["rank"],
            "backbone": e["backbone"],
            "size": e["image_size"],
            "best head": e["head"],
            f"val {metric}": fmt_number(e["val"][metric]),
            f"test {metric} [95% CI]": f"{fmt_number(e['test'][metric])} [{fmt_number(lo, 3)}, {fmt_number(hi, 3)}]",
            # Selection picked the head (and its epoch) on val: a large positive gap is that choice's optimism.
            "val−test": _gap(e["val"][metric], e["test"][metric]),
            "test acc": fmt_number(e["test"]["accuracy"]),
            "tie": "≈ best" if e["tied_with_best"] else ("best" if e["rank"] == 1 else ""),
        }
        if e.get("transfer"):
            row["LogME"] = fmt_number(e["transfer"]["logme"], 3)
            row["kNN LOO acc"] = fmt_number(e["transfer"]["knn_loo"])
        if e.get("cv"):
            row[f"cv {metric}"] = f"{fmt_number(e['cv']['mean'])} ± {fmt_number(e['cv']['std'])}"
        if e.get("logreg"):
            ci = (e["logreg"].get("test_ci") or {}).get(metric)
            row[f"logreg val/test {metric}"] = (f"{fmt_number(e['logreg']['val'][metric])} / "
                                                 f"{fmt_number(e['logreg']['test'][metric])}"
                                                 + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
        row["params (M)"] = fmt_number(e["params"] / 1e6, 2) if e.get("params") else ""
        prof = latency.get((e["backbone"], int(e["image_size"])))
        if latency:
            row[f"latency p50 (ms, {latency_label(latency)})"] = fmt_number(prof["p50_ms"], 2) if prof else ""
            row["GFLOPs"] = fmt_number(prof["gflops"], 2) if prof else ""
        row["weights"] = e["weights"]
        rows.append(row)
    return rows
