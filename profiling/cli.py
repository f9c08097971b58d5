"""`python -m profiling`: ONNX Runtime latency, FLOPs and size of each backbone, and accuracy against latency."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from extract.backbones import BackboneError
from extract.config import ConfigError, add_common_flags, document_defaults, settings_from_args, verbosity
from extract.console import setup_logging
from extract.models import WeightsError
from profiling.pipeline import run_profiling
from profiling.settings import ProfilingSettings

log = logging.getLogger("profiling")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m profiling",
        description="Export each backbone to ONNX (dynamic batch), check it against PyTorch on real images, count "
        "its FLOPs, and time it with ONNX Runtime (and PyTorch eager for reference). Without --backbones: every "
        "backbone `extract` cached in WORKDIR, with the same weights and preprocessing.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--workdir", type=Path, help="where results go (and caches are read from)")
    p.add_argument("--backbones", help="set names, timm names or patterns, as for extract (default: the cached ones)")
    p.add_argument("--backbones-file", type=Path, help="YAML with named backbone sets")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="random weights (with --backbones)")
    p.add_argument("--weights-dir", type=Path, help="folder of local weights (with --backbones)")
    p.add_argument("--image-size", type=int, nargs="+", help="input size(s) (with --backbones)")
    p.add_argument("--data", help="images for the ONNX-vs-PyTorch check (default: the workdir's dataset, else demo)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="batch sizes to time")
    p.add_argument("--provider", choices=["auto", "cpu", "cuda", "tensorrt"],
                   help="ONNX Runtime provider (auto: TensorRT, then CUDA, then CPU)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: ORT's choice, one per core)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="device of the PyTorch eager reference")
    p.add_argument("--warmup", type=int, help="untimed runs before timing")
    p.add_argument("--min-runs", type=int, help="timed runs at least")
    p.add_argument("--min-seconds", type=float, help="seconds of timed runs at least")
    p.add_argument("--tolerance", type=float, help="largest accepted max relative error of ONNX against PyTorch")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_common_flags(p, "profiling")
    document_defaults(p, ProfilingSettings())
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbosity(args))
    try:
        s = settings_from_args(args, ProfilingSettings, "profiling")
        result = run_profiling(
            workdir=s.workdir, backbones=s.backbones or None, backbones_file=s.backbones_file, pretrained=s.pretrained,
            weights_dir=s.weights_dir, image_sizes=s.image_size or None, data=s.data, batch_sizes=tuple(s.batch_sizes),
            provider=s.provider, threads=s.threads, device=s.device, warmup=s.warmup, min_runs=s.min_runs,
            min_seconds=s.min_seconds, tolerance=s.tolerance, progress=s.progress)
    except (ConfigError, BackboneError, WeightsError, RuntimeError) as exc:
        log.error("%s", exc)
        return 2
    print(result["table"])
    for f in result["failures"]:
        print(f"FAILED {f['backbone']}@{f['image_size']}: {f['error']}")
    print(f"\nResults: {result['folder']}/performance.csv, performance.json"
          + (f", {result['pareto']}" if result["pareto"] else ""))
    return 1 if result["failures"] and not result["records"] else 0


if __name__ == "__main__":
    sys.exit(main())
