"""Optional experiment tracking: each command's settings, metrics and artifacts as an MLflow run (issue #13).

Like the report, it reads what the command left in the workdir (nothing in memory), after the results
were written. One MLflow experiment per workdir (``backbone-bench/<workdir name>``), one run per command
invocation. Without ``--mlflow`` (or ``tracking.mlflow_uri``) nothing imports MLflow.

MLflow 3 keeps the ``file:`` store in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE``
is set; for a ``file:`` URI given here we set it (a user who names a file store wants one). A database
(``sqlite:///mlflow.db``, needs the full ``mlflow`` package) or a server (``http://...``) work as given.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from report.html import read_json
from runtime.errors import is_storage_failure

log = logging.getLogger(__name__)

_BAD = re.compile(r"[^0-9A-Za-z_\-. /]")  # what MLflow accepts in metric and parameter names


def _key(*parts: Any) -> str:
    return _BAD.sub("_", "/".join(str(p) for p in parts if p != ""))


def _unit(backbone: str, size: Any) -> str:
    return _key(backbone, f"{size}px")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[_key(f"{prefix}{key}")] = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return out


def _probe(workdir: Path) -> tuple[list[tuple[str, float, int]], list[Path]]:
    results = read_json(workdir / "probe" / "results.json") or {}
    metric, out = results.get("metric"), []
    for row in results.get("rows", []):  # every head of the grid: its validation metric
        value = row.get(f"val_{metric}")
        if value is not None:
            out.append((_key(_unit(row["backbone"], row["image_size"]), row["head"], f"val_{metric}"), value, 0))
    for e in results.get("leaderboard", []):  # the chosen head: every metric, test with its interval
        unit = _unit(e["backbone"], e["image_size"])
        for split in ("val", "test"):
            out += [(_key(unit, "chosen", f"{split}_{m}"), v, 0) for m, v in e[split].items() if isinstance(v, float)]
        for m, ci in (e.get("test_ci") or {}).items():
            if ci:
                out += [(_key(unit, "chosen", f"test_{m}_ci_low"), ci[0], 0), (_key(unit, "chosen", f"test_{m}_ci_high"), ci[1], 0)]
        out += [(_key(unit, k), v, 0) for k, v in (e.get("transfer") or {}).items() if isinstance(v, float)]
    folder = workdir / "probe"
    files = [folder / n for n in ("results.json", "results.csv", "leaderboard.md")] + sorted((folder / "confusion").glob("*.png"))
    return out, files


def _profiling(workdir: Path) -> tuple[list[tuple[str, float, int]], list[Path]]:
    report = read_json(workdir / "profiling" / "performance.json") or {}
    out = []
    for r in report.get("records", []):
        unit = _key(_unit(r["backbone"], r["image_size"]), f"batch{r['batch_size']}")
        out += [(_key(unit, k), float(r[k]), 0) for k in ("p50_ms", "p90_ms", "p99_ms", "cv", "throughput", "gflops",
                                                           "onnx_mb") if r.get(k) is not None]
    folder = workdir / "profiling"
    return out, [folder / n for n in ("performance.json", "performance.csv", "pareto.png")]


def _finetune(workdir: Path) -> tuple[list[tuple[str, float, int]], list[Path]]:
    folder = workdir / "finetune"
    summary = read_json(folder / "summary.json") or {}
    metric, out = summary.get("metric"), []
    for r in summary.get("results", []):
        unit = _unit(*r["name"].rsplit("@", 1))
        study = folder / Path(r["best_dir"]).name if r.get("best_dir") else None  # the study's folder name
        for trial_dir in sorted(study.glob("trial-*")) if study else ():
            history = trial_dir / "metrics.csv"
            if not history.is_file():
                continue
            for row in csv.DictReader(history.open()):  # per trial and epoch
                for column in ("train_loss", "val_loss", f"val_{metric}"):
                    if row.get(column) not in (None, ""):
                        out.append((_key(unit, trial_dir.name, column), float(row[column]), int(row["epoch"])))
        best = r.get("best") or {}
        for k in ("val", "test"):
            if best.get(k) is not None:
                out.append((_key(unit, "best", f"{k}_{metric}"), best[k], 0))
        if best.get("test_ci"):
            out += [(_key(unit, "best", f"test_{metric}_ci_low"), best["test_ci"][0], 0),
                    (_key(unit, "best", f"test_{metric}_ci_high"), best["test_ci"][1], 0)]
        if (r.get("latency") or {}).get("p50_ms") is not None:
            out.append((_key(unit, "best", "onnx_p50_ms"), r["latency"]["p50_ms"], 0))
    files = [folder / n for n in ("summary.md", "summary.json", "search.png")]
    files += sorted((folder / "gradcam").glob("*.png")) + sorted((folder / "best").glob("*/model.onnx"))
    return out, files


COLLECT = {"probe": _probe, "profiling": _profiling, "finetune": _finetune}


def track(settings: Any, command: str) -> str | None:
    """Log ``command``'s run to ``settings.mlflow``; returns the MLflow run id (``None`` when off or failed).
    A tracking server that is down costs a warning, never the results; a full disk stops like any write."""
    uri = getattr(settings, "mlflow", None)
    if not uri:
        return None
    workdir = Path(settings.workdir)
    try:
        return _log_run(uri, workdir, command, settings.plain())
    except Exception as exc:
        if is_storage_failure(exc):
            raise
        log.warning("MLflow (%s): the %s run was not logged (%s: %s); the results in %s are complete", uri, command,
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", workdir)
        return None


def _log_run(uri: str, workdir: Path, command: str, params: dict[str, Any]) -> str:
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    name = f"backbone-bench/{workdir.resolve().name}"
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(experiment_id, run_name=f"{command} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                            tags={"command": command, "workdir": str(workdir.resolve())})
    run_id = run.info.run_id
    flat = [Param(k, v[:6000]) for k, v in _flatten(params).items()]
    metrics, files = COLLECT.get(command, lambda _: ([], []))(workdir)
    now = int(time.time() * 1000)
    values = [Metric(k, float(v), now, step) for k, v, step in metrics]
    for i in range(0, len(flat), 100):  # MLflow takes at most 100 parameters per batch ...
        client.log_batch(run_id, params=flat[i:i + 100])
    for i in range(0, len(values), 1000):  # ... and 1000 metric values
        client.log_batch(run_id, metrics=values[i:i + 1000])
    for path in [workdir / "report.html", workdir / "config.yaml", workdir / "dataset.json", *files]:
        if path.is_file():
            relative = path.parent.relative_to(workdir)
            client.log_artifact(run_id, str(path), artifact_path=None if str(relative) == "." else str(relative))
    client.set_terminated(run_id)
    log.info("MLflow: logged the %s run %s (%d parameters, %d metric values) to %s", command, run_id, len(flat),
             len(values), uri)
    return run_id
