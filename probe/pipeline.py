"""`probe` as a library call: every cached backbone gets the grid, the best head on validation, test once."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache import open_cache, select_caches
from configs.probe import Grid, HeadConfig, ProbeSettings, load_grid
from probe.baseline import logreg_baseline
from probe.head_onnx import write_head_onnx
from probe.heads import head_checkpoint
from probe.leaderboard import leaderboard_rows, mark_ties, ranked_by
from probe.metrics import METRICS, bootstrap_ci, compute_metrics, default_top_k, metrics_of_heads
from probe.plots import plot_confusion, plot_confusion_grid
from probe.results import read_results
from probe.train import Examples, Fit, TrainedHead, predict_proba, products_dtype, train_grid
from probe.transferability import knn_loo_accuracy, logme
from report.latency import read_latency
from runtime.console import Phases, format_table, progress
from runtime.device import dtype_name, pick_device
from runtime.files import atomic_write_text, new_version, publish, save_torch, write_csv
from runtime.locks import exclusive

log = logging.getLogger(__name__)

METRIC_NAMES = tuple(METRICS)


@dataclass
class ProbeOutputs:
    entries: list[dict[str, Any]]  # one per backbone x size, ranked
    leaderboard: str
    folder: Path


def _better(metric: str, a: float, b: float) -> bool:
    return a > b if METRICS[metric] else a < b


def choose(trained: list[TrainedHead], metric: str, scores: list[float] | None = None) -> int:
    """Index of the best head by validation score — its smoothed selection score, or the given CV
    scores — first in grid order on a tie."""
    scores = scores if scores is not None else [t.score for t in trained]
    best = 0
    for i, s in enumerate(scores):
        if _better(metric, s, scores[best]):
            best = i
    return best


def cross_validate(configs: tuple[HeadConfig, ...], labelled: Examples, folds: int, num_classes: int,
                   fit: Fit) -> np.ndarray:
    """(folds, heads) validation metric of every head by stratified K-fold CV over train+val."""
    # Imported here: scikit-learn costs ~0.8 s to import, and only --folds needs it.
    from sklearn.model_selection import StratifiedKFold

    x, y = labelled.features, labelled.labels
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=fit.seed)
    out = []
    for k, (tr, va) in enumerate(skf.split(x, y)):
        trained = train_grid(configs, Examples(x[tr], y[tr]), Examples(x[va], y[va]), num_classes, fit,
                             desc=f"fold {k + 1}/{folds}")
        out.append([t.val_metric for t in trained])
    return np.asarray(out)


def labelled(train: Any, val: Any) -> Examples:
    """The plain (unaugmented) train features and the validation ones, with their labels: all that is not test."""
    return Examples(np.concatenate([train.features[train.views == 0], val.features]),
                    np.concatenate([train.labels[train.views == 0], val.labels]))


def transfer_scores(x: np.ndarray, y: np.ndarray, name: str) -> dict[str, float]:
    """LogME and kNN leave-one-out accuracy on the labelled features: a ranking that trains nothing, shown
    beside the probe's so a user can see whether it agrees."""
    t0 = time.perf_counter()
    score = logme(x, y)
    t1 = time.perf_counter()
    knn = knn_loo_accuracy(x, y)
    t2 = time.perf_counter()
    log.info("%s: LogME %.3f, kNN leave-one-out accuracy %.4f", name, score, knn)  # the phase line has the time
    return {"logme": score, "knn_loo": knn, "logme_seconds": t1 - t0, "knn_seconds": t2 - t1}


def probe_cache(path: Path, grid: Grid, settings: ProbeSettings, device: torch.device, out: Path
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Probe one cache, its files written into ``out`` (the next version of ``WORKDIR/probe``): returns its
    leaderboard entry, which names the files where they will be published, and its rows for results.csv."""
    t0 = time.perf_counter()
    metric, seed, folds = settings.selection_metric, settings.seed, settings.folds
    published = settings.workdir / "probe"
    fit = Fit(metric=metric, options=grid.train, seed=seed, device=device)
    phase = Phases(path.stem, log)
    with phase("load"), open_cache(path) as fc:
        train = fc.load("train", views=fc.num_views > 0)
        val, test = fc.load("val"), fc.load("test")
        info = {"backbone": fc.backbone, "image_size": fc.image_size, "model": fc.model, "weights": fc.weights,
                "model_kwargs": fc.key.get("model_kwargs") or {}, "data_config": fc.data_config,
                "weights_location": fc.meta.get("weights_location"), "classes": fc.classes,
                "params": fc.meta.get("params"), "cache": str(path), "views": fc.num_views}
    classes = info["classes"]
    c = len(classes)
    k = settings.top_k or default_top_k(c)
    name = phase.name = f"{info['backbone']}@{info['image_size']}"
    configs = grid.heads if settings.grid else (grid.default,)
    if info["weights"] == "random":
        log.warning("%s: features of RANDOM weights (extracted with --no-pretrained)", name)

    cv = None
    scores = None
    known = labelled(train, val)
    if folds:
        if info["views"]:
            log.info("%s: cross-validation uses the plain (unaugmented) features", name)
        with phase("cross-validation", f"{folds} folds x {len(configs)} heads"):
            per_fold = cross_validate(configs, known, folds, c, fit)
        scores = list(per_fold.mean(0))
        cv = {"mean": per_fold.mean(0), "std": per_fold.std(0)}

    with phase("LogME and kNN"):
        transfer = transfer_scores(known.features, known.labels, name)
    precision = dtype_name(products_dtype(grid.train, device))
    log.info("%s: training %d head(s) on %d x %d features (%s products)", name, len(configs),
             *train.features.shape, precision)
    with phase("grid", f"{len(configs)} heads"):
        trained = train_grid(configs, train, val, c, fit, progress=settings.progress, desc=name)
    best = choose(trained, metric, scores)
    chosen = trained[best]

    # Test metrics: once, for the chosen head only.
    with phase("test metrics", f"{settings.bootstrap} bootstrap resamples"):
        test_proba = predict_proba(chosen.head, test.features)
        test_metrics = compute_metrics(test.labels, test_proba, top_k=k, per_class=True)
        ci = bootstrap_ci(test.labels, test_proba, n_boot=settings.bootstrap, seed=seed, top_k=k)

    rows = []
    for i, (t, val_m) in enumerate(zip(trained, metrics_of_heads(val.labels, [t.val_proba for t in trained], top_k=k))):
        row: dict[str, Any] = {"backbone": info["backbone"], "image_size": info["image_size"], "head": t.config.name,
                               **{f"cfg_{key}": v for key, v in t.config.applicable().items()},
                               "best_epoch": t.best_epoch, "chosen": i == best,
                               **{f"val_{m}": val_m[m] for m in METRIC_NAMES}}
        if cv is not None:
            row.update(cv_mean=float(cv["mean"][i]), cv_std=float(cv["std"][i]))
        if i == best:
            row.update({f"test_{m}": test_metrics[m] for m in METRIC_NAMES})
            row.update({f"test_{m}_ci_low": ci[m][0] for m in METRIC_NAMES})
            row.update({f"test_{m}_ci_high": ci[m][1] for m in METRIC_NAMES})
        row.update(seed=seed, weights=info["weights"], cache=info["cache"])
        rows.append(row)
    val_best = compute_metrics(val.labels, chosen.val_proba, top_k=k)

    logreg = None
    if settings.baseline == "logreg":
        with phase("logreg baseline", "L-BFGS over the C path, its test CIs"):
            lr = logreg_baseline(train, val, metric=metric, num_classes=c)
            lr_val = compute_metrics(val.labels, lr.predict_proba(val.features), top_k=k)
            lr_proba = lr.predict_proba(test.features)
            lr_test = compute_metrics(test.labels, lr_proba, top_k=k)
            # the baseline's test metrics get intervals like the chosen head's (same resamples: same seed)
            lr_ci = bootstrap_ci(test.labels, lr_proba, n_boot=settings.bootstrap, seed=seed, top_k=k)
        logreg = {"C": lr.C, "val": lr_val, "test": lr_test, "test_ci": lr_ci}
        rows.append({"backbone": info["backbone"], "image_size": info["image_size"], "head": f"logreg-C{lr.C:g}",
                     "cfg_type": "logreg", "chosen": False, **{f"val_{m}": lr_val[m] for m in METRIC_NAMES},
                     **{f"test_{m}": lr_test[m] for m in METRIC_NAMES},
                     **{f"test_{m}_ci_{side}": lr_ci[m][i] for m in lr_ci for i, side in enumerate(("low", "high"))
                        if lr_ci[m] is not None},
                     "seed": seed, "weights": info["weights"], "cache": info["cache"]})

    # The chosen head, loadable on its backbone with torch.load(weights_only=True).
    head_path = out / "heads" / f"{name}.pt"
    head_path.parent.mkdir(parents=True, exist_ok=True)
    with phase("head files", "checkpoint and ONNX"):
        save_torch(head_checkpoint(chosen.head, chosen.config, dim=train.features.shape[1], num_classes=c, info={
            **{key: info[key] for key in ("backbone", "model", "model_kwargs", "weights", "weights_location",
                                          "image_size", "data_config", "classes")},
            "metric": metric, "val_metric": chosen.val_metric, "seed": seed,
        }), head_path)
        write_head_onnx(chosen.head, head_path.with_suffix(".onnx"))
    history_path = out / "history" / f"{name}.csv"
    with phase("history and plot"):
        write_csv(history_path, chosen.history)
        plot_confusion(np.asarray(test_metrics["confusion"]), classes,
                       f"{name} — {chosen.config.name}\ntest {metric} {test_metrics[metric]:.3f}",
                       out / "confusion" / f"{name}.png", random_weights=info["weights"] == "random")
    entry = {**info, "head": chosen.config.name, "head_config": chosen.config.to_dict(), "val": val_best,
             "test": test_metrics, "test_ci": ci, "logreg": logreg, "transfer": transfer, "n_heads": len(configs),
             "grid_precision": precision,
             "grid_seconds": phase.seconds["grid"], "seconds": time.perf_counter() - t0,
             "phase_seconds": phase.seconds,
             "head_file": str(published / head_path.relative_to(out)),
             "head_onnx": str(published / head_path.with_suffix(".onnx").relative_to(out)),
             "history_file": str(published / history_path.relative_to(out)),
             "cv": {"mean": float(cv["mean"][best]), "std": float(cv["std"][best]), "folds": folds} if cv else None}
    log.info("%s: best %s, val %s %.4f, test %.4f [%.3f, %.3f]; %d heads in %.2fs, %.1fs in all", name,
             chosen.config.name, metric, val_best[metric], test_metrics[metric], *ci[metric], len(configs),
             phase.seconds["grid"], entry["seconds"])
    return entry, rows


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if np.isnan(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


def render_leaderboard(workdir: Path, ranked: list[dict[str, Any]], *, metric: str, n_boot: int, seed: int,
                       n_heads: int, ordinal: bool, folder: Path | None = None) -> str:
    """``leaderboard.md`` in ``folder`` (``WORKDIR/probe``): the ranked entries, with latency and FLOPs where
    ``profiling/`` has them."""
    table = format_table(leaderboard_rows(ranked, metric, read_latency(workdir)))
    # which products trained the heads: bfloat16 ones choose within seed-level noise of float32's (README)
    products = sorted({e["grid_precision"] for e in ranked if e.get("grid_precision")})
    trained = f", trained with {' and '.join(products)} products" if products else ""
    header = (f"# Probe leaderboard\n\nSorted by {ranked_by(ranked, metric)} (the selection metric); test metrics with 95% "
              f"bootstrap CIs ({n_boot} resamples of the test images). '≈ best': the test CI overlaps the top one's. "
              "'val−test': how much the validation metric the selection saw exceeds test (its optimism). "
              "LogME and kNN LOO acc: training-free scores of the features (train + val), higher is better.\n"
              f"Seed {seed}; {n_heads} head(s) per backbone{trained}{'; ordinal labels' if ordinal else ''}.\n")
    if any(e["weights"] == "random" for e in ranked):
        header += "\n**Some backbones use RANDOM weights (--no-pretrained): their numbers say nothing about pretrained quality.**\n"
    leaderboard = header + "\n" + table + "\n"
    atomic_write_text((folder or Path(workdir) / "probe") / "leaderboard.md", leaderboard)
    return leaderboard


def refresh_leaderboard(workdir: Path) -> ProbeOutputs:
    """Re-render the leaderboard from ``probe/results.json`` (e.g. after profiling), training nothing."""
    data = read_results(workdir, f"Run `python -m probe --workdir {workdir}` first.")
    ranked = data["leaderboard"]
    for e in ranked:  # JSON turned the CI tuples into lists and NaN into null
        e["test_ci"] = {k: tuple(float("nan") if v is None else v for v in ci) for k, ci in e["test_ci"].items()}
    text = render_leaderboard(workdir, ranked, metric=data["metric"], n_boot=data["bootstrap"], seed=data["seed"],
                              n_heads=data["n_heads"], ordinal=data["ordinal"])
    return ProbeOutputs(entries=ranked, leaderboard=text, folder=Path(workdir) / "probe")


def _probe_all(paths: list[Path], head_grid: Grid, s: ProbeSettings, dev: torch.device, out: Path
               ) -> tuple[list[dict[str, Any]], str]:
    metric, grid, n_heads = s.selection_metric, s.grid, len(head_grid.heads) if s.grid else 1
    entries, rows = [], []
    for path in progress(paths, desc="caches", unit="cache", enabled=s.progress and len(paths) > 1):
        entry, r = probe_cache(path, head_grid, s, dev, out)
        entries.append(entry)
        rows += r
    ranked = mark_ties(entries, metric)
    leaderboard = render_leaderboard(s.workdir, ranked, metric=metric, n_boot=s.bootstrap, seed=s.seed,
                                     n_heads=n_heads, ordinal=s.ordinal, folder=out)
    write_csv(out / "results.csv", rows)
    atomic_write_text(out / "results.json", json.dumps(_jsonable({
        "metric": metric, "ranked_by": ranked_by(ranked, metric), "seed": s.seed, "grid": grid, "n_heads": n_heads, "ordinal": s.ordinal, "folds": s.folds,
        "bootstrap": s.bootstrap, "leaderboard": ranked, "rows": rows}), indent=2))
    top = ranked[:4]
    if len(top) == 1:  # one backbone: its own figure is the top one, not drawn a second time (~0.15 s)
        shutil.copyfile(out / "confusion" / f"{top[0]['backbone']}@{top[0]['image_size']}.png",
                        out / "confusion" / "top.png")
    elif top:
        plot_confusion_grid([(f"#{e['rank']} {e['backbone']}@{e['image_size']}\n{e['head']}\n"
                              f"test split, {metric} {e['test'][metric]:.3f}", np.asarray(e["test"]["confusion"]))
                             for e in top], ranked[0]["classes"], out / "confusion" / "top.png",
                            random_weights=any(e["weights"] == "random" for e in top))
    return ranked, leaderboard


def run_probe(settings: ProbeSettings) -> ProbeOutputs:
    """Train heads on every selected cache, choose on validation, test once, write ``probe/``."""
    s = settings
    workdir, metric, grid = s.workdir, s.selection_metric, s.grid
    head_grid = load_grid(s.grid_file)
    paths = select_caches(workdir, list(s.backbones))
    dev = pick_device(s.device)
    published = workdir / "probe"
    n_heads = len(head_grid.heads) if grid else 1
    log.info("Probing %d cache(s) with %d head(s) each on %s; selection by validation %s", len(paths), n_heads, dev, metric)
    with exclusive(workdir, "probe"):
        # Everything is written into a new version and published in one step: after a kill at any moment,
        # readers (profiling, finetune) see the previous complete set of results and heads, or this one.
        out = new_version(published)
        try:
            ranked, leaderboard = _probe_all(paths, head_grid, s, dev, out)
            publish(out, published)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
    return ProbeOutputs(entries=ranked, leaderboard=leaderboard, folder=published)
