"""`python -m profiling`: ONNX Runtime latency, FLOPs and size of each backbone, and accuracy against latency."""

from __future__ import annotations

import argparse
import logging
import sys

from cache import complete_caches
from configs.flags import build_parser as settings_parser
from configs.flags import given, verbosity
from configs.layers import resolve, write_resolved
from configs.profiling import ProfilingSettings
from report.html import write_report
from report.tracking import track
from runtime.console import setup_logging
from runtime.errors import as_user_error
from runtime.process import imports_done

log = logging.getLogger("profiling")


def build_parser() -> argparse.ArgumentParser:
    return settings_parser(
        ProfilingSettings, "python -m profiling",
        "Export each backbone to ONNX (dynamic batch), check it against PyTorch on real images, count its FLOPs, "
        "and time it with ONNX Runtime (and PyTorch eager for reference). Without --backbones: every backbone "
        "`extract` cached in WORKDIR, with the same weights and preprocessing.")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbosity(args))
    try:
        settings = resolve(ProfilingSettings, "profiling", args.config, given(args))
        settings.apply_environment()
        if not settings.backbones:  # the workdir's caches are what it profiles: checked before anything heavy loads
            complete_caches(settings.workdir)
        log.info("Loading torch, timm and ONNX Runtime")  # seconds on a CPU: say so, not nothing
        from profiling.pipeline import run_profiling  # torch, timm and ONNX load only once there is work to do

        imports_done()

        result = run_profiling(settings)
        if result["records"]:  # after the results, inside the try: a full disk here is a one-line error too
            write_resolved(settings.workdir, "profiling", settings)
            write_report(settings.workdir)
            track(settings, "profiling")
    except Exception as exc:
        if (problem := as_user_error(exc)) is None:
            raise  # a bug: keep its traceback
        log.error("%s", problem)
        return 2
    except KeyboardInterrupt:
        log.error("Interrupted; the last complete run's performance files are unchanged, and the ONNX exports "
                  "that finished are reused next time")
        return 130
    print(result["table"])
    for f in result["failures"]:
        print(f"FAILED {f['backbone']}@{f['image_size']}: {f['error']}")
    print(f"\nResults: {result['folder']}/performance.csv, performance.json"
          + (f", {result['pareto']}" if result["pareto"] else ""))
    if result["failures"] and not result["records"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
