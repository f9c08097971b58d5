"""What a person reads after stage two: ``summary.md`` and the plot of each search."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from probe.leaderboard import fmt_number  # noqa: E402
from probe.metrics import METRICS  # noqa: E402
from runtime.console import format_table  # noqa: E402
from runtime.figures import save_png  # noqa: E402


def _with_ci(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return ""
    if not ci or any(c is None for c in ci):
        return fmt_number(value)
    return f"{value:.4f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def plot_searches(studies: Sequence[dict[str, Any]], metric: str, path: Path, random_weights: bool = False) -> Path:
    """One panel per backbone: the validation metric of every trial (the default configuration starred), the
    best so far, the probe's value."""
    n = max(1, len(studies))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.3), squeeze=False)
    higher = METRICS[metric]
    for ax, study in zip(axes[0], studies):
        trials = study["trials"]
        ok = [(t["trial"], t["metric"]) for t in trials if t["status"] == "ok" and t["metric"] is not None]
        failed = [t["trial"] for t in trials if t["status"] == "failed"]
        if ok:
            xs, ys = zip(*ok)
            ax.scatter(xs, ys, s=18, label="trial", zorder=3)
            default = [(x, y) for x, y in ok if x == 0]  # trial 0 is always the default configuration
            if default:
                ax.scatter(*zip(*default), s=110, marker="*", color="C2", label="default configuration", zorder=4)
            best, running = [], None
            for t in sorted(trials, key=lambda t: t["trial"]):
                if t["status"] == "ok" and t["metric"] is not None:
                    running = t["metric"] if running is None else (max if higher else min)(running, t["metric"])
                best.append((t["trial"], running))
            bx, by = zip(*[(x, y) for x, y in best if y is not None])
            ax.step(bx, by, where="post", color="C1", label="best so far")
        if failed:
            low = min((y for _, y in ok), default=0.0)
            ax.scatter(failed, [low] * len(failed), marker="x", color="C3", label="failed", zorder=3)
        if study.get("probe_val") is not None:
            ax.axhline(study["probe_val"], ls="--", color="grey", lw=1, label="probe")
        ax.set_title(f"{study['name']}\n{study['optimizer']}", fontsize=9)
        ax.set_xlabel("trial")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"val {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if random_weights:
        fig.suptitle("RANDOM WEIGHTS (--no-pretrained)", color="tab:red", fontsize=10, fontweight="bold")
    fig.tight_layout()
    return save_png(fig, path, 110)


def summary_rows(results: Sequence[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        best = r.get("best") or {}
        latency = r.get("latency") or {}
        probe = r.get("probe") or {}
        rows.append({
            "backbone": r["name"],
            "probe head": probe.get("head", ""),
            f"probe val {metric}": fmt_number(probe.get("val")),
            f"probe test {metric}": _with_ci(probe.get("test"), probe.get("test_ci")),
            f"fine-tuned val {metric}": fmt_number(best.get("val")),
            f"fine-tuned test {metric}": _with_ci(best.get("test"), best.get("test_ci")),
            "trials ok/failed": f"{r['ok']}/{r['failed']}",
            "search": r["optimizer"],
            "p50 ms (b1)": fmt_number(latency.get("p50_ms"), 2),
            "GFLOPs": fmt_number(latency.get("gflops"), 2),
        })
    return rows


RANKERS = (("probe val", "val"), ("LogME", "logme"), ("kNN LOO", "knn_loo"))


def _ranks(values: Sequence[float | None], higher: bool = True) -> list[int | None]:
    """1 = best; None where a value is missing."""
    known = sorted((v for v in values if v is not None), reverse=higher)
    return [None if v is None else known.index(v) + 1 for v in values]


def stage_agreement(results: Sequence[dict[str, Any]], metric: str) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Each fine-tuned backbone's stage-one ranks (probe validation metric, LogME, kNN leave-one-out) beside its
    stage-two rank (fine-tuned validation metric), and Kendall's tau of each stage-one ranking against stage
    two's (with three or more backbones; tau = 1: the same order, -1: reversed)."""
    done = [r for r in results if r.get("best")]
    higher = METRICS[metric]
    final = _ranks([r["best"]["val"] for r in done], higher)
    rows, taus = [], {}
    columns = {}
    for label, key in RANKERS:
        values = [(r.get("probe") or {}).get(key) for r in done]
        columns[label] = (values, _ranks(values, higher if key == "val" else True))
    for i, r in enumerate(done):
        row: dict[str, Any] = {"backbone": r["name"]}
        for label, (values, ranks) in columns.items():
            row[f"{label} (rank)"] = "" if values[i] is None else f"{fmt_number(values[i], 3)} ({ranks[i]})"
        row[f"fine-tuned val {metric} (rank)"] = f"{fmt_number(r['best']['val'], 3)} ({final[i]})"
        rows.append(row)
    if len(done) >= 3:
        from scipy.stats import kendalltau

        for label, (values, _) in columns.items():
            pairs = [(v, r["best"]["val"]) for v, r in zip(values, done) if v is not None]
            if len(pairs) >= 3:
                a, b = zip(*pairs)
                tau = float(kendalltau(a, b).statistic)
                # LogME and kNN accuracy are higher-is-better; against a lower-is-better metric the order flips.
                taus[label] = -tau if not higher and label != "probe val" else tau
    return rows, taus


def render_summary(results: Sequence[dict[str, Any]], *, metric: str, workdir: Path, random_weights: bool,
                   agreement: tuple[list[dict[str, Any]], dict[str, float]] | None = None) -> str:
    """``summary.md``; ``agreement`` is :func:`stage_agreement`'s result when the caller already has it."""
    lines = ["# Fine-tuning summary", "",
             f"Selection by validation {metric}; the best trial of each backbone tested once (95% bootstrap CIs). "
             "Latency: the whole fine-tuned model as ONNX under ONNX Runtime, batch 1.", ""]
    if random_weights:
        lines += ["**Some backbones use RANDOM weights (--no-pretrained): the numbers say nothing about pretrained "
                  "quality.**", ""]
    lines += [format_table(summary_rows(results, metric)), ""]
    agreement, taus = agreement or stage_agreement(results, metric)
    if agreement:
        lines += ["## Stage one against stage two", "",
                  "Does the cheap ranking pick what fine-tuning confirms? Stage-one scores (rank) of the backbones "
                  f"fine-tuned here, beside their fine-tuned validation {metric} (rank)."
                  + (" Kendall's tau of each stage-one ranking against stage two's: "
                     + ", ".join(f"{k} {v:+.2f}" for k, v in taus.items())
                     + " (1: the same order; 0: unrelated; -1: reversed)." if taus else
                     " Kendall's tau needs three or more fine-tuned backbones."), "",
                  format_table(agreement), ""]
    for r in results:
        best = r.get("best")
        lines.append(f"## {r['name']}")
        if best:
            params = ", ".join(f"{k}={fmt_number(v, 4) if isinstance(v, float) else v}" for k, v in best["params"].items())
            lines.append(f"- best trial {best['trial']:03d} (epoch {best.get('best_epoch')}): {params}")
            lines.append(f"- files: `{r['best_dir']}` (best_model.pt, metrics.json, confusion.png, model.onnx)")
        else:
            lines.append("- no trial finished; see trials.jsonl for the reasons")
        if r.get("gradcam"):
            lines.append(f"- Grad-CAM: `{r['gradcam']}`" + (f", probe head: `{r['gradcam_probe']}`" if r.get("gradcam_probe") else ""))
        for t in r.get("failed_trials", []):
            lines.append(f"- trial {t['trial']:03d} failed: {t['reason']}")
        lines.append("")
    lines.append(f"Search plot: `{Path(workdir) / 'finetune' / 'search.png'}`")
    return "\n".join(lines) + "\n"
