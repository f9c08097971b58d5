"""`finetune` as a library call: pick backbones from the probe leaderboard, search, test the best, explain."""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from cache import check_same_dataset, names_backbone
from configs.finetune import FinetuneSettings, TuningConfig
from configs.settings import ConfigError
from extract.models import file_tag
from finetune.data import FinetuneData, check_augment, load_data
from finetune.deploy import export_and_time
from finetune.evaluate import evaluate_test
from finetune.gradcam import explain
from finetune.model import RECORD_KEYS, Target, load_checkpoint, probe_head
from finetune.report import plot_searches, render_summary, stage_agreement, summary_rows
from finetune.search import SearchOptions, Study, TrialRecord, search_name, searches
from finetune.trainer import TrialSetup, run_trial
from probe.classifier import load_classifier
from probe.metrics import METRICS
from probe.results import stage_one_results
from profiling.export import ExportError
from profiling.latency import choose_providers
from runtime.console import Phases, format_table, progress
from runtime.device import pick_device
from runtime.files import atomic_write_text
from runtime.locks import exclusive

log = logging.getLogger(__name__)


@dataclass
class FinetuneOutputs:
    results: list[dict[str, Any]]
    summary: str
    folder: Path
    metric: str  # the selection metric as resolved (the probe's unless --metric)


def select_targets(workdir: Path, *, top: int, backbones: list[str] | None, metric: str | None
                   ) -> tuple[list[Target], str]:
    """The ``top`` backbones of the probe leaderboard by validation ``metric`` (or those named)."""
    data = stage_one_results(workdir)
    metric = metric or data["metric"]
    entries = [e for e in data["leaderboard"] if e.get("val", {}).get(metric) is not None]
    higher = METRICS[metric]
    if metric == data["metric"] and all("rank" in e for e in entries):
        entries.sort(key=lambda e: e["rank"])  # the probe's own ranking (cross-validated where --folds ran)
    else:
        entries.sort(key=lambda e: -e["val"][metric] if higher else e["val"][metric])
    if backbones:
        chosen = [e for e in entries if any(names_backbone(b, e["backbone"], e["image_size"]) for b in backbones)]
        if not chosen:
            names = ", ".join(f"{e['backbone']}@{e['image_size']}" for e in entries)
            raise ConfigError(f"--backbones {','.join(backbones)} matches nothing the probe ranked ({names})")
    else:
        chosen = entries[:top]
    # The files are looked up in this workdir by name, not at the paths results.json recorded: those are as the
    # probe was given them (relative to its working directory), and a workdir may since have been moved or copied.
    caches = [Path(workdir) / "features" / Path(e["cache"]).name for e in chosen]
    check_same_dataset(workdir, caches)
    targets = []
    for e, cache in zip(chosen, caches):
        targets.append(Target(record={k: e.get(k) for k in RECORD_KEYS}, cache=cache,
                              head_file=Path(workdir) / "probe" / "heads" / Path(e["head_file"]).name
                              if e.get("head_file") else None,
                              probe={"head": e["head"], "val": e["val"][metric], "test": e["test"][metric],
                                     "test_ci": e["test_ci"].get(metric), "weights": e["weights"],
                                     **{k: (e.get("transfer") or {}).get(k) for k in ("logme", "knn_loo")}}))
    return targets, metric


def _move_aside(folder: Path) -> None:
    if folder.exists():
        old = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        folder.rename(old)
        log.info("--restart: the previous study is kept in %s", old)


def _search(target: Target, data: FinetuneData, tuning: TuningConfig, folder: Path, settings: FinetuneSettings,
            setup: TrialSetup) -> Study:
    s, metric = settings, setup.metric
    # What every trial starts from: a study goes on only from the same head (stage one may have chosen again).
    head = "random" if s.head == "random" else "probe:" + file_tag(Path(target.head_file)).removeprefix("file:")
    study = Study(folder, tuning, SearchOptions(optimizer=s.optimizer, ng_optimizer=s.ng_optimizer, budget=s.budget,
                                                workers=s.workers, metric=metric, seed=s.seed, head=head))
    bar = progress(total=study.budget, desc=f"{target.name} trials", unit="trial", enabled=s.progress)

    def objective(n: int, point: dict[str, Any], stop: Any):
        trial_setup = replace(setup.for_trial(n), progress=s.progress and s.workers == 1)
        return run_trial(target, data, tuning.params(point), tuning, folder / f"trial-{n:03d}", trial_setup, stop)

    if s.executor == "local":
        trials = objective
    else:
        from finetune.jobs import JobTrials

        trials = JobTrials(s, target, tuning, folder, setup, record=study.record_job)

    def on_end(record: TrialRecord) -> None:
        bar.update(1)
        best = study.best()
        if best is not None:
            bar.set_postfix({f"best {metric}": f"{best.metric:.4f}"})

    try:
        study.run(trials, on_end=on_end)
    finally:
        bar.close()
    return study


def _finish(target: Target, data: FinetuneData, study: Study, trials: list[dict[str, Any]],
            settings: FinetuneSettings, setup: TrialSetup) -> dict[str, Any]:
    """Test the best trial once, export and time it; returns its summary entry."""
    metric = setup.metric
    out = settings.workdir / "finetune"
    name = target.slug
    result: dict[str, Any] = {
        "name": target.name, "optimizer": search_name(study),
        "ok": sum(t["status"] == "ok" for t in trials), "failed": sum(t["status"] == "failed" for t in trials),
        "failed_trials": [t for t in trials if t["status"] == "failed"], "probe": target.probe, "best": None,
        "weights": target.record["weights"]}
    best = study.best()
    if best is None:
        log.error("%s: every trial failed; nothing to test", target.name)
        return result
    best_dir = out / "best" / name
    best_dir.mkdir(parents=True, exist_ok=True)
    source = study.folder / f"trial-{best.number:03d}" / "best_model.pt"
    checkpoint = best_dir / "best_model.pt"
    metrics_path = best_dir / "metrics.json"
    previous = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    # Tested once: again only if another checkpoint is now the best (another trial, a restarted study).
    stat = source.stat()
    identity = {"file": str(source), "mtime_ns": stat.st_mtime_ns, "bytes": stat.st_size}
    fresh = previous.get("source_checkpoint") == identity and checkpoint.is_file() and previous.get("test") is not None
    if not fresh:
        shutil.copy2(source, checkpoint)
        model, _ = load_checkpoint(checkpoint)
        phase = Phases(target.name, log)
        with phase(f"trial {best.number} tested once on the test split",
                   f"{len(data.splits['test'].paths)} images, {settings.bootstrap} bootstrap resamples"):
            evaluated = evaluate_test(model, target, data, best_dir, setup, settings.bootstrap)
        record = {"backbone": target.name, "trial": best.number, "source_checkpoint": identity, "params": best.point, "metric": metric,
                  "val": best.metric, "best_epoch": best.best_epoch, **evaluated}
        if settings.latency:
            try:
                with phase("ONNX export, its check against PyTorch, and its latency"):
                    record["latency"] = export_and_time(checkpoint, target.data_config, data.splits["val"], best_dir,
                                                        settings.provider)
            except (ExportError, RuntimeError) as exc:
                log.warning("%s: no ONNX latency (%s)", target.name, exc)
        atomic_write_text(metrics_path, json.dumps(record, indent=2))
        previous = record
    else:
        log.info("%s: trial %d was already tested; reusing %s", target.name, best.number, metrics_path)
    result.update(best={"trial": best.number, "params": best.point, "val": best.metric, "best_epoch": best.best_epoch,
                        "test": previous["test"][metric], "test_ci": previous["test_ci"].get(metric)},
                  latency=previous.get("latency"), best_dir=str(best_dir))
    return result


def _explain(target: Target, data: FinetuneData, tuning: TuningConfig, workdir: Path, device: torch.device,
             result: dict[str, Any], metric: str) -> None:
    """Grad-CAM grids of validation images for the fine-tuned model and for the probe classifier."""
    if result.get("best") is None or tuning.gradcam.images < 1:
        return
    out = workdir / "finetune" / "gradcam"
    name = target.slug
    override = next((layer for pattern, layer in tuning.gradcam.target_layers.items()
                     if fnmatch.fnmatch(target.record["model"], pattern) or fnmatch.fnmatch(target.record["backbone"], pattern)), None)
    kwargs = dict(images=data.splits["val"], classes=data.classes, data_cfg=target.data_config,
                  n=tuning.gradcam.images, override=override)
    weights = "RANDOM weights" if target.record["weights"] == "random" else f"weights {target.record['weights']}"
    phase = Phases(target.name, log)
    try:
        with phase("Grad-CAM of the fine-tuned model", f"{tuning.gradcam.images} validation images"):
            model, _ = load_checkpoint(Path(result["best_dir"]) / "best_model.pt")
            result["gradcam"] = str(explain(model.to(device), path=out / f"{name}.png", **kwargs,
                                            heading=f"{target.name} fine-tuned (trial {result['best']['trial']}, val "
                                                    f"{metric} {result['best']['val']:.3f}), {weights}"))
        if target.head_file is not None and target.head_file.is_file():
            with phase("Grad-CAM of the probe's classifier", f"{tuning.gradcam.images} validation images"):
                probe_model, _ = load_classifier(target.head_file)  # a kNN head too: explain() scores its vote mass
                result["gradcam_probe"] = str(explain(probe_model.to(device), path=out / f"{name}-probe.png", **kwargs,
                                                      heading=f"{target.name} probe ({target.probe['head']}, val "
                                                              f"{metric} {target.probe['val']:.3f}), {weights}"))
    except Exception as exc:  # an explanation must not cost the results
        log.warning("%s: Grad-CAM failed (%s: %s); set gradcam.target_layers for this architecture",
                    target.name, type(exc).__name__, exc)


def run_finetune(settings: FinetuneSettings, tuning: TuningConfig) -> FinetuneOutputs:
    """Search each chosen backbone with ``tuning``, test its best trial once, write ``finetune/``."""
    s = settings
    workdir = s.workdir
    targets, metric = select_targets(workdir, top=s.top, backbones=list(s.backbones), metric=s.metric)
    # What the run needs is checked here, before any study starts: a missing or unreadable probe head, or
    # augmentation options timm refuses, would otherwise be recorded as each trial's failure (which a resumed
    # study keeps after the cause is fixed).
    for target in targets:
        if s.head == "probe":
            probe_head(target)
        check_augment(target.data_config, tuning.augment)
    if s.latency:  # the final latency's engine, before hours of training rather than after
        choose_providers(s.provider)
    dev = pick_device(s.device)
    setup = TrialSetup(metric=metric, device=dev, head=s.head, seed=s.seed, data_workers=s.data_workers,
                       progress=s.progress)
    out = workdir / "finetune"
    optimizer, budget = s.optimizer, s.budget
    search = f"{optimizer} search, budget {budget}" if searches(optimizer, tuning) else "no search (the default configuration)"
    log.info("Fine-tuning %d backbone(s) on %s: %s; %s, selection by validation %s",
             len(targets), dev, ", ".join(t.name for t in targets), search, metric)
    results, studies = [], []
    for target in targets:
        if target.record["weights"] == "random":
            log.warning("%s: RANDOM backbone weights (the cache was extracted with --no-pretrained)", target.name)
        folder = out / target.slug
        if s.restart:
            _move_aside(folder)
        data = load_data(workdir, target.cache)
        # One process per study: a second one would run the same trials in the same folders.
        with exclusive(workdir, f"study-{target.slug}"):
            study = _search(target, data, tuning, folder, s, setup)
            summary = study.summary()
            atomic_write_text(folder / "study.json", json.dumps({**summary, "backbone": target.name, "head": s.head,
                                                                 "spec_source": tuning.source}, indent=2))
            result = _finish(target, data, study, summary["trials"], s, setup)
            _explain(target, data, tuning, workdir, dev, result, metric)
        results.append(result)
        studies.append({"name": target.name, "optimizer": result["optimizer"], "trials": summary["trials"],
                        "probe_val": target.probe.get("val")})
    plot_searches(studies, metric, out / "search.png", random_weights=any(r["weights"] == "random" for r in results))
    agreement, taus = stage_agreement(results, metric)
    text = render_summary(results, metric=metric, workdir=workdir, agreement=(agreement, taus),
                          random_weights=any(r["weights"] == "random" for r in results))
    atomic_write_text(out / "summary.md", text)
    atomic_write_text(out / "summary.json", json.dumps({"metric": metric, "results": results}, indent=2, default=str))
    table = format_table(summary_rows(results, metric))
    if len(agreement) > 1:
        table += "\n\nStage one against stage two:\n" + format_table(agreement)
        if taus:
            table += "\nKendall's tau vs the fine-tuned ranking: " + ", ".join(f"{k} {v:+.2f}" for k, v in taus.items())
    return FinetuneOutputs(results=results, summary=table, folder=out, metric=metric)
