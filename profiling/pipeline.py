"""`profiling` as a library call: export, check, count and time each backbone; write ``profiling/``."""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import timm
import timm.data
import torch
from PIL import Image

from cache import CacheError, complete_caches, dataset_record, open_cache
from cache.schema import safe_name
from configs.profiling import ProfilingSettings
from extract.backbones import load_sets, resolve_backbones
from extract.dataset import load_dataset
from extract.models import backbone_from_record, choose_weights, create_backbone, preprocessing
from extract.pipeline import Unit  # one backbone at one size: what extract caches and profiling times
from profiling.export import ExportError, append_head, export_onnx, matmul_flops, max_relative_error
from profiling.flops import count_flops, count_parameters
from profiling.latency import choose_providers, make_session, measure_eager, measure_onnxruntime, peak_matmul_gflops
from profiling.pareto import ParetoPoint, plot_pareto
from runtime.console import Phases, format_table, progress
from runtime.device import pick_device
from runtime.files import atomic_write_text, write_csv
from runtime.images import IMAGE_SUFFIXES, load_rgb

log = logging.getLogger(__name__)

# How far under the roofline floor a p50 must be to be flagged. The floor's peak is itself a measurement (the best
# rate seen in a second or two of matrix multiplies) that moves by 10-20% with a shared host's load, and a network
# can run at the machine's true peak: the demo's ResNet-10t at batch 8 measured 29.0 ms against a 29.2 ms floor.
# What the flag is for, a FLOP count off by 2x or a timing that skipped the work, lands far below it.
FLOOR_TOLERANCE = 0.8


def targets_from_caches(workdir: Path) -> list[Unit]:
    """What `extract` cached in ``workdir``: the same model, weights and preprocessing."""
    out = []
    for path in complete_caches(workdir):
        with open_cache(path) as fc:
            spec, weights, size_kwargs = backbone_from_record(
                model=fc.model, name=fc.backbone, model_kwargs=fc.key.get("model_kwargs"), weights_tag=fc.weights,
                weights_location=fc.meta.get("weights_location"))
            out.append(Unit(spec, None, weights, fc.data_config, size_kwargs))
    return out


def targets_from_names(settings: ProfilingSettings) -> list[Unit]:
    """``--backbones`` with their weights (pretrained unless --no-pretrained) at each ``--image-size``."""
    s = settings
    out = []
    for spec in resolve_backbones(list(s.backbones), sets=load_sets(s.backbones_file)):
        weights = choose_weights(spec, pretrained=s.pretrained is not False, weights_dir=s.weights_dir)
        for size in list(s.image_size) or [None]:
            data_cfg, size_kwargs = preprocessing(spec, size)
            out.append(Unit(spec, size, weights, data_cfg, size_kwargs))
    return out


def check_images(workdir: Path, data: str | None, n: int = 8) -> list[Image.Image]:
    """Real images for the numeric check (decoded, RGB): the workdir's dataset, ``--data``, or the demo digits.

    Profiling only reads the workdir's dataset record: another ``--data`` (or the demo) is read in a scratch
    folder, so neither ``dataset.json`` nor the workdir's images change.
    """
    record = workdir / "dataset.json"
    if data is None and record.is_file():
        info = dataset_record(workdir)
        root = Path(info["root"])
        # The first images of the recorded dataset, in its own (sorted) order.
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        skipped = {s["id"] for s in info.get("skipped", [])}
        paths = [p for p in paths if p.relative_to(root).as_posix() not in skipped]
        if paths:
            return [load_rgb(p) for p in paths[:: max(1, len(paths) // n)][:n]]
    with tempfile.TemporaryDirectory(prefix="profiling-images-") as scratch:
        dataset = load_dataset(data or "demo", workdir=Path(scratch))
        samples = dataset.samples[:: max(1, len(dataset.samples) // n)][:n]
        return [load_rgb(s.path) for s in samples]


@dataclass(frozen=True)
class Bench:
    """What every backbone is measured with here: the images of the numeric check, ONNX Runtime's providers,
    the device of the PyTorch reference, and the machine's matmul peak (for the roofline floor)."""

    images: list[Image.Image]
    providers: list[str]
    device: torch.device
    peak_gflops: float


def measure_here(targets: list[Unit], settings: ProfilingSettings
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Profile ``targets`` in this process: (records, failures, this machine's description)."""
    s = settings
    dev = pick_device(s.device)
    providers = choose_providers(s.provider)
    peak = peak_matmul_gflops(dev, providers=providers, threads=s.threads)
    bench = Bench(check_images(s.workdir, s.data), providers, dev, peak)
    log.info("Profiling %d backbone(s) with %s, batch sizes %s; matmul peak %.0f GFLOPS", len(targets), providers[0],
             list(s.batch_sizes), peak)
    machine = machine_info(dev, peak)
    records, failures = [], []
    for target in progress(targets, desc="profiling", unit="model", enabled=s.progress):
        t0 = time.perf_counter()
        try:
            # each record says where it was measured (jobs may run on several nodes)
            records += [{**r, "node": machine["node"], "hardware": machine["hardware"]}
                        for r in profile_target(target, s, bench)]
            log.info("%s profiled in %.1fs", target.name, time.perf_counter() - t0)
        except Exception as exc:  # one backbone's failure must not stop the others
            log.error("%s: %s: %s", target.name, type(exc).__name__, exc)
            failures.append({"backbone": target.spec.name, "image_size": target.image_size,
                             "error": f"{type(exc).__name__}: {exc}"})
    return records, failures, machine


def profile_target(target: Unit, settings: ProfilingSettings, bench: Bench) -> list[dict[str, Any]]:
    """Every record for one backbone: one per batch size (ONNX Runtime and PyTorch eager side by side)."""
    out, head_dir = settings.workdir / "profiling", settings.workdir / "probe" / "heads"
    images, providers, device, peak_gflops = bench.images, bench.providers, bench.device, bench.peak_gflops
    threads, tolerance = settings.threads, settings.tolerance
    timing = {"warmup": settings.warmup, "min_runs": settings.min_runs, "min_seconds": settings.min_seconds}
    phase = Phases(target.name, log)  # each step logged as it ends: a backbone takes ~20 s on two cores
    model, untrained = create_backbone(target.spec, target.weights, exportable=True, **target.size_kwargs)
    input_size = tuple(target.data_cfg["input_size"])
    with phase("FLOPs"):
        flops = count_flops(model, input_size)
    params = count_parameters(model)
    stem = f"{safe_name(target.spec.name)}@{target.image_size}"
    onnx_path = out / f"{stem}.onnx"
    head_path = head_dir / f"{stem}.onnx"
    with_head = head_path.is_file()
    key = {"model": target.spec.model, "kwargs": target.spec.kwargs, "size_kwargs": target.size_kwargs,
           "weights": target.weights.tag, "input_size": input_size}
    # The backbone's own graph; with a probe head, the deployable model is backbone + head in one graph.
    backbone_path = out / "backbones" / f"{stem}.onnx" if with_head else onnx_path
    with phase("ONNX export") as step:
        exported = export_onnx(model, input_size, backbone_path, key=key)
        step.detail = "reused: the model is unchanged" if exported.reused else "new"

    with phase("ONNX checked against PyTorch", f"{len(images)} images" + (", with the probe's head" if with_head else "")):
        tf = timm.data.create_transform(**target.data_cfg, is_training=False)
        x = torch.stack([tf(image) for image in images])
        with torch.no_grad():
            reference = model(x).numpy()
        if with_head:
            onnx_path.with_suffix(".onnx.json").unlink(missing_ok=True)  # it is no longer the backbone-only export
            append_head(backbone_path, head_path, onnx_path)
            head_session = ort.InferenceSession(str(head_path), providers=["CPUExecutionProvider"])
            # The reference is PyTorch's backbone followed by the probe's own exported head.
            reference = head_session.run(None, {head_session.get_inputs()[0].name: reference})[0]
            flops += matmul_flops(head_path)
        session, session_info, created_s = make_session(onnx_path, providers, threads, cache_dir=out / "trt-cache")
        onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        rel = max_relative_error(reference, onnx_out)
    if not rel <= tolerance:
        raise ExportError(f"ONNX and PyTorch outputs differ: max relative error {rel:.2e} > tolerance {tolerance:.0e}")

    model.to(device)
    records = []
    for bs in settings.batch_sizes:
        batch = torch.randn(bs, *input_size)
        with phase(f"batch {bs} timed", "ONNX Runtime, then PyTorch eager"):
            ort_stats = measure_onnxruntime(session, batch.numpy(), **timing)
            eager = measure_eager(model, batch, device, **timing)  # the backbone: the head is not a PyTorch module here
        floor_ms = flops * bs / (peak_gflops * 1e9) * 1e3
        below_floor = ort_stats.p50_ms < FLOOR_TOLERANCE * floor_ms
        records.append({
            "backbone": target.spec.name, "model": target.spec.model, "image_size": target.image_size, "batch_size": bs,
            "provider": session_info["providers"][0], "threads": session_info["intra_op_num_threads"],
            **ort_stats.as_dict(), **eager.as_dict("torch_"),
            "session_create_ms": created_s * 1e3, "gflops": flops / 1e9, "gmacs": flops / 2e9, "params": params,
            "onnx_mb": onnx_path.stat().st_size / 1e6, "onnx_file": str(onnx_path), "onnx_reused": exported.reused,
            "with_probe_head": with_head,
            "export_seconds": exported.seconds, "max_rel_error": rel, "weights": target.weights.tag,
            "untrained_modules": len(untrained), "roofline_floor_ms": floor_ms,
            "floor_fraction": floor_ms / ort_stats.p50_ms if ort_stats.p50_ms else None,
            "below_floor": below_floor, "session_options": session_info,
        })
        if ort_stats.noisy:
            log.warning("%s batch %d: noisy measurement (CV %.0f%%)", target.name, bs, 100 * ort_stats.cv)
        if below_floor:
            log.warning("%s batch %d: p50 %.3f ms is %.0f%% below the roofline floor %.3f ms — a counting or timing "
                        "error", target.name, bs, ort_stats.p50_ms, 100 * (1 - ort_stats.p50_ms / floor_ms), floor_ms)
    return records


def machine_info(device: torch.device, peak_gflops: float) -> dict[str, Any]:
    cuda = torch.cuda.get_device_name(0) if device.type == "cuda" else None
    processor = platform.processor() or platform.machine()
    return {"node": socket.gethostname(), "hardware": cuda or f"{processor}, {os.cpu_count()} cores",
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "platform": platform.platform(), "processor": processor,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(device), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "peak_matmul_gflops": peak_gflops,
            "versions": {"torch": torch.__version__, "timm": timm.__version__, "onnxruntime": ort.__version__,
                         "onnx": onnx.__version__}}


def read_probe_scores(workdir: Path) -> tuple[str | None, dict[tuple[str, int], tuple[float, list[float] | None]]]:
    """Test metric and its 95% interval per (backbone, size) from ``probe/results.json`` (a file: stages share
    files, not code)."""
    try:
        data = json.loads((workdir / "probe" / "results.json").read_text())
    except (OSError, ValueError):
        return None, {}
    metric = data.get("metric")
    return metric, {(e["backbone"], int(e["image_size"])): (e["test"][metric], (e.get("test_ci") or {}).get(metric))
                    for e in data.get("leaderboard", [])}


def run_profiling(settings: ProfilingSettings) -> dict[str, Any]:
    """Profile every target; a failing backbone is recorded and the others still run."""
    s = settings
    workdir, batch_sizes = s.workdir, s.batch_sizes
    out = workdir / "profiling"
    out.mkdir(parents=True, exist_ok=True)
    if s.backbones:
        targets = targets_from_names(s)
    else:
        targets = targets_from_caches(workdir)
        if not targets:
            raise CacheError(f"no complete feature caches in {workdir / 'features'}; run `python -m extract` first, "
                             "or name backbones with --backbones")
    if s.executor != "local":
        from profiling.jobs import profile_with_jobs

        records, failures, machines = profile_with_jobs(targets, s)
    else:
        records, failures, machine = measure_here(targets, s)
        machines = {machine["node"]: machine}
    # "machine": where the (first) records were measured; "machines": every node that measured some
    first = records[0]["node"] if records else next(iter(machines), None)
    report = {"machine": machines.get(first, {}), "machines": machines, "records": records, "failures": failures}
    atomic_write_text(out / "performance.json", json.dumps(report, indent=2, default=str))
    if records:
        write_csv(out / "performance.csv", records)
    metric, scores = read_probe_scores(workdir)
    b1 = [r for r in records if r["batch_size"] == min(batch_sizes) and (r["backbone"], r["image_size"]) in scores]
    pareto_path = None
    if b1:
        points = [ParetoPoint(name=f"{r['backbone']}@{r['image_size']}", score=scores[(r["backbone"], r["image_size"])][0],
                              ci=scores[(r["backbone"], r["image_size"])][1], p50_ms=r["p50_ms"], p99_ms=r["p99_ms"],
                              cv=r["cv"], noisy=r["noisy"], gflops=r["gflops"], architecture=r["model"])
                  for r in b1]
        pareto_path = plot_pareto(points, metric=metric, random_weights=any(r["weights"] == "random" for r in b1),
                                  latency_label=f"ONNX Runtime latency, ms: p50, bar to p99 ({b1[0]['provider']}, "
                                                f"batch {min(batch_sizes)})", path=out / "pareto.png")
    elif records:
        log.info("No pareto.png: it plots the probe's test metric, and %s has none for these backbones (run "
                 "`python -m probe` first)", workdir / "probe" / "results.json")
    table = format_table([{
        "backbone": r["backbone"], "size": r["image_size"], "+head": "yes" if r["with_probe_head"] else "",
        "batch": r["batch_size"], "p50 ms": r["p50_ms"],
        "p95 ms": r["p95_ms"], "p99 ms": r["p99_ms"], "cv": r["cv"], "img/s": r["throughput"],
        "torch p50 ms": r["torch_p50_ms"], "GFLOPs": r["gflops"], "params M": r["params"] / 1e6, "ONNX MB": r["onnx_mb"],
        "max rel err": f"{r['max_rel_error']:.1e}", "noisy": "yes" if r["noisy"] else "",
        **({"node": r["node"], "hardware": r["hardware"]} if s.executor != "local" else {}),
    } for r in records])
    return {"records": records, "failures": failures, "table": table, "pareto": pareto_path, "folder": out}
