"""``WORKDIR/report.html``: everything a workdir holds, in one self-contained page (issue #13).

Every command refreshes it at its end from the files the stages wrote — nothing is passed in
memory, so the report is the same whichever command wrote it last, and ``python -m probe
--report-only`` rebuilds it alone. Images are embedded as data URIs and the page loads nothing
from the network: it opens from a USB stick or an e-mail attachment. A section whose stage has
not run says so.
"""

from __future__ import annotations

import base64
import json
import logging
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote

from report.latency import read_latency
from runtime.errors import is_storage_failure
from runtime.files import atomic_write_text

log = logging.getLogger(__name__)

REPORT = "report.html"
LIBRARIES = ("torch", "timm", "numpy", "scikit-learn", "h5py", "onnx", "onnxruntime", "onnxruntime-gpu",
             "nevergrad", "grad-cam", "matplotlib", "submitit")


def read_json(path: Path) -> Any:
    """A workdir file's JSON, or ``None`` when the stage has not written it (or left it unreadable)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _image(path: Path, caption: str, workdir: Path) -> dict[str, str] | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return {"caption": caption, "src": "data:image/png;base64," + base64.b64encode(data).decode("ascii"),
            "link": quote(path.relative_to(workdir).as_posix())}  # relative: the page still works when moved


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _dataset(workdir: Path) -> dict[str, Any] | None:
    record = read_json(workdir / "dataset.json")
    if not isinstance(record, dict):
        return None
    counts = record.get("counts") or {}
    classes = list(record.get("classes") or [])
    splits = [s for s in ("train", "val", "test") if s in counts]
    return {"root": record.get("root"), "classes": classes, "splits": splits,
            "rows": [{"class": c, **{s: counts[s].get(c, 0) for s in splits}} for c in classes],
            "totals": {s: counts[s].get("total", 0) for s in splits},
            "skipped": record.get("num_skipped", 0), "skipped_files": list(record.get("skipped") or [])[:50],
            "unreadable": record.get("unreadable") or {}}


def _leaderboard(workdir: Path) -> dict[str, Any] | None:
    results = read_json(workdir / "probe" / "results.json")
    if not isinstance(results, dict):
        return None
    metric = results["metric"]
    latency = read_latency(workdir)
    rows = []
    for e in results.get("leaderboard", []):
        ci = (e.get("test_ci") or {}).get(metric) or [None, None]
        timing = latency.get((e["backbone"], int(e["image_size"])), {})
        transfer = e.get("transfer") or {}
        logreg = e.get("logreg") if isinstance(e.get("logreg"), dict) else {}
        baseline = (logreg.get("val") or {}).get(metric)
        baseline_test = (logreg.get("test") or {}).get(metric)
        baseline_ci = (logreg.get("test_ci") or {}).get(metric) or [None, None]
        rows.append({"rank": e.get("rank"), "backbone": e["backbone"], "size": e["image_size"],
                     "weights": e.get("weights"), "head": e.get("head"), "val": e["val"].get(metric),
                     "test": e["test"].get(metric), "ci_low": ci[0], "ci_high": ci[1],
                     "tied": bool(e.get("tied_with_best")), "logreg": baseline, "logreg_test": baseline_test,
                     "logreg_ci": baseline_ci, "logme": transfer.get("logme"),
                     "knn": transfer.get("knn_loo"), "p50_ms": timing.get("p50_ms"), "noisy": timing.get("noisy"),
                     "gflops": timing.get("gflops")})
    return {"metric": metric, "ranked_by": results.get("ranked_by") or f"validation {metric}", "rows": rows,
            "random": any(r["weights"] == "random" for r in rows)}


def _finetuned(summary: Any) -> tuple[list[str], list[str]]:
    """The best-model folders and Grad-CAM files of the last fine-tune's backbones (its ``summary.json``). Those of
    backbones an earlier run fine-tuned (another --top) stay on disk, but beside this run's table they would
    read as its results."""
    results = summary.get("results", []) if isinstance(summary, dict) else []
    best = [Path(r["best_dir"]).name for r in results if r.get("best_dir")]
    gradcam = [Path(r[key]).name for r in results for key in ("gradcam", "gradcam_probe") if r.get(key)]
    return best, gradcam


def _images(workdir: Path, finetune_summary: Any) -> dict[str, list[dict[str, str]]]:
    best, gradcam = _finetuned(finetune_summary)
    groups = {
        "profiling": [(workdir / "profiling" / "pareto.png", "Accuracy against latency (profiling/pareto.png)")],
        "confusion": [(p, f"Probe confusion matrix, test split: {p.stem}")
                      for p in sorted((workdir / "probe" / "confusion").glob("*.png")) if p.stem != "top"],
        "finetune": [(workdir / "finetune" / "search.png", "Search curves (finetune/search.png)")]
        + [(workdir / "finetune" / "best" / name / "confusion.png", f"Fine-tuned confusion matrix, test split: {name}")
           for name in best],
        "gradcam": [(workdir / "finetune" / "gradcam" / name, f"Grad-CAM, validation images: {Path(name).stem}")
                    for name in gradcam],
    }
    return {name: [img for path, caption in items if path.is_file() and (img := _image(path, caption, workdir))]
            for name, items in groups.items()}


def _finetune(summary: Any) -> dict[str, Any] | None:
    """The stage-two table from the fine-tune's ``summary.json`` (None before a fine-tune has run)."""
    if not isinstance(summary, dict):
        return None
    rows = []
    for r in summary.get("results", []):
        best, probe = r.get("best") or {}, r.get("probe") or {}
        rows.append({"name": r["name"], "weights": r.get("weights"), "probe_val": probe.get("val"),
                     "probe_test": probe.get("test"), "probe_ci": probe.get("test_ci") or [None, None],
                     "val": best.get("val"), "test": best.get("test"), "ci": best.get("test_ci") or [None, None],
                     "trials": f"{r.get('ok', 0)}/{r.get('failed', 0)}", "search": r.get("optimizer")})
    return {"metric": summary.get("metric"), "rows": rows}


def render(workdir: Path) -> str:
    """The report's HTML for ``workdir`` as it is now."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    workdir = Path(workdir)
    env = Environment(loader=PackageLoader("report", "templates"), autoescape=select_autoescape(["html", "j2"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda v, digits=4: "" if v is None else f"{v:.{digits}f}"
    config = workdir / "config.yaml"
    leaderboard = _leaderboard(workdir)
    finetune_summary = read_json(workdir / "finetune" / "summary.json")  # the table and its images: read once
    finetune = _finetune(finetune_summary)
    random = bool(leaderboard and leaderboard["random"]) or any(
        r["weights"] == "random" for r in (finetune or {}).get("rows", []))
    return env.get_template("report.html.j2").render(
        workdir=str(workdir), written=time.strftime("%Y-%m-%d %H:%M:%S"), dataset=_dataset(workdir),
        leaderboard=leaderboard, finetune=finetune, images=_images(workdir, finetune_summary), random=random,
        config=config.read_text() if config.is_file() else None, versions=_versions())


def write_report(workdir: Path) -> Path | None:
    """Refresh ``WORKDIR/report.html``. A full disk or a permission error stops the command like any other
    write; a problem in the report itself only costs the report (a warning), never the results."""
    path = Path(workdir) / REPORT
    try:
        atomic_write_text(path, render(workdir))
    except Exception as exc:
        if is_storage_failure(exc):
            raise
        log.warning("report.html not refreshed (%s: %s); the results themselves are complete",
                    type(exc).__name__, exc)
        return None
    log.info("Report: %s", path)
    return path
