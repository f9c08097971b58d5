"""`python -m finetune`: stage two — progressive unfreezing under a hyperparameter search, with Grad-CAM."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cache import CacheError
from extract.config import ConfigError, add_common_flags, document_defaults, settings_from_args, verbosity
from extract.console import setup_logging
from extract.models import WeightsError
from finetune.pipeline import run_finetune
from finetune.search import StudyError
from finetune.settings import FinetuneSettings
from finetune.space import load_spec
from probe.metrics import METRICS

log = logging.getLogger("finetune")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m finetune",
        description="Stage two: fine-tune the best backbones of the probe leaderboard (backbone + the probe's head) "
        "with progressive unfreezing while Nevergrad searches the hyperparameters; test the best trial once, "
        "export and time it, and explain it with Grad-CAM.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--workdir", type=Path, help="the workdir `extract` and `probe` filled")
    p.add_argument("--top", type=int, help="fine-tune the K best backbones (x resolution) of the probe leaderboard")
    p.add_argument("--backbones", help="comma-separated names or patterns instead of --top")
    p.add_argument("--optimizer", choices=["nevergrad", "random", "none"],
                   help="the search: Nevergrad, random search (same budget and space), or the default config only")
    p.add_argument("--ng-optimizer", help="Nevergrad optimizer name (NGOpt picks one from the space and budget)")
    p.add_argument("--budget", type=int, help="trials per backbone, the default configuration included")
    p.add_argument("--workers", type=int, help="trials run at once (Nevergrad is told: never more open asks)")
    p.add_argument("--metric", choices=list(METRICS), help="selection metric on validation (default: the probe's)")
    p.add_argument("--head", choices=["probe", "random"], help="start from the probe's chosen head, or a random linear one")
    p.add_argument("--space", type=Path, help="a finetune config overlaying the shipped configs/finetune.yaml")
    p.add_argument("--epochs", type=int, help="override train.epochs of the finetune config")
    p.add_argument("--gradcam-images", type=int, help="validation images per Grad-CAM grid (0: none)")
    p.add_argument("--seed", type=int, help="seed of the search, head initialisation, batch order and bootstrap")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="where trials train")
    p.add_argument("--data-workers", type=int, help="image decoding workers of each trial")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples of the test set for the confidence intervals")
    p.add_argument("--no-latency", dest="latency", action="store_false", help="skip the ONNX export and timing")
    p.add_argument("--provider", choices=["auto", "cpu", "cuda", "tensorrt"], help="ONNX Runtime provider for the latency")
    p.add_argument("--restart", action="store_true", help="move existing studies aside and start over")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_common_flags(p, "finetune")
    document_defaults(p, FinetuneSettings())
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbosity(args))
    try:
        s = settings_from_args(args, FinetuneSettings, "finetune")
        spec = load_spec(s.space, s.overlay())
        result = run_finetune(workdir=s.workdir, spec=spec, top=s.top, backbones=s.backbones or None,
                              optimizer=s.optimizer, ng_optimizer=s.ng_optimizer, budget=s.budget, workers=s.workers,
                              metric=s.metric, head=s.head, device=s.device, seed=s.seed, data_workers=s.data_workers,
                              n_boot=s.bootstrap, latency=s.latency, provider=s.provider, restart=s.restart,
                              progress=s.progress)
    except (ConfigError, CacheError, StudyError, WeightsError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("Interrupted. Finished trials are kept in trials.jsonl; run the same command to continue.")
        return 130
    print(result.summary)
    print(f"Reports: {result.folder}/summary.md, search.png, best/, gradcam/ (trials in {result.folder}/<backbone>@<res>/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
