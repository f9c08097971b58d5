"""`python -m finetune`: stage two — progressive unfreezing under a hyperparameter search, with Grad-CAM."""

from __future__ import annotations

import argparse
import logging
import sys

from configs.finetune import FinetuneSettings, load_tuning
from configs.flags import build_parser as settings_parser
from configs.flags import given, verbosity
from configs.layers import resolve, write_resolved
from probe.results import stage_one_results
from report.html import write_report
from report.tracking import track
from runtime.console import setup_logging
from runtime.errors import as_user_error
from runtime.process import imports_done

log = logging.getLogger("finetune")


def build_parser() -> argparse.ArgumentParser:
    return settings_parser(
        FinetuneSettings, "python -m finetune",
        "Stage two: fine-tune the best backbones of the probe leaderboard (backbone + the probe's head) with "
        "progressive unfreezing while Nevergrad searches the hyperparameters; test the best trial once, export "
        "and time it, and explain it with Grad-CAM.")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbosity(args))
    try:
        settings = resolve(FinetuneSettings, "finetune", args.config, given(args))
        settings.apply_environment()
        tuning = load_tuning(settings.space, settings.overlay())
        stage_one_results(settings.workdir)  # a workdir without them is answered before anything heavy loads
        log.info("Loading torch, timm, Nevergrad and pytorch-grad-cam")  # seconds on a CPU: say so, not nothing
        from finetune.pipeline import run_finetune  # torch, timm and Nevergrad load only once there is work to do

        imports_done()

        result = run_finetune(settings, tuning)
        # after the results, inside the try: a full disk here is the same one-line error as anywhere else
        write_resolved(settings.workdir, "finetune", settings.model_copy(update={"metric": result.metric}))
        write_report(settings.workdir)
        track(settings, "finetune")
    except Exception as exc:
        if (problem := as_user_error(exc)) is None:
            raise  # a bug: keep its traceback
        log.error("%s", problem)
        return 2
    except KeyboardInterrupt:
        log.error("Interrupted. Finished trials are kept in trials.jsonl; run the same command to continue.")
        return 130
    print(result.summary)
    print(f"Reports: {result.folder}/summary.md, search.png, best/, gradcam/ "
          f"(trials in {result.folder}/<backbone>@<res>/)")
    if not any(r["best"] for r in result.results):  # as profiling does when nothing could be measured
        log.error("No backbone has a finished trial: every trial failed (their reasons are in summary.md)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
