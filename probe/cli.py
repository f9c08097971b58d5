"""`python -m probe`: train uniform heads on the cached features, rank the backbones."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cache import CacheError
from extract.config import ConfigError, add_common_flags, document_defaults, settings_from_args, verbosity
from extract.console import setup_logging
from probe.metrics import METRICS
from probe.pipeline import refresh_leaderboard, run_probe
from probe.settings import ProbeSettings

log = logging.getLogger("probe")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m probe",
        description="Stage one, part 2: train heads on the cached features of every backbone in WORKDIR, choose "
        "the best head per backbone on validation, test it once, and rank the backbones.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--workdir", type=Path, help="the workdir `extract` filled")
    p.add_argument("--grid", action="store_true", help="train the whole grid of the grid file (else its one default head)")
    p.add_argument("--grid-file", type=Path, help="the grid definition (default: the shipped configs/probe.yaml)")
    p.add_argument("--backbones", help="comma-separated cached backbone names or patterns (default: every cache)")
    p.add_argument("--metric", choices=list(METRICS), help="selection metric on validation (default: macro_f1; qwk with --ordinal)")
    p.add_argument("--baseline", choices=["none", "logreg"], help="also fit scikit-learn's logistic regression, C chosen on validation")
    p.add_argument("--folds", type=int, help="K-fold cross-validation over train+val: heads chosen by the mean, mean ± std reported")
    p.add_argument("--ordinal", action="store_true", help="labels are ordered (grades): select by quadratic weighted kappa")
    p.add_argument("--seed", type=int, help="seed of head initialisation, batch order and bootstrap")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="where the heads train")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples of the test set for the confidence intervals")
    p.add_argument("--top-k", type=int, help="k of top-k accuracy (default: 3 when there are more than 3 classes)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: re-render leaderboard.md from results.json (e.g. after `profiling` ran)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_common_flags(p, "probe")
    document_defaults(p, ProbeSettings())
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbosity(args))
    try:
        s = settings_from_args(args, ProbeSettings, "probe")
        if s.report_only:
            result = refresh_leaderboard(s.workdir)
            print(result.leaderboard)
            return 0
        result = run_probe(workdir=s.workdir, backbones=s.backbones or None, grid=s.grid, grid_file=s.grid_file,
                           metric=s.selection_metric, baseline=s.baseline, folds=s.folds, ordinal=s.ordinal,
                           seed=s.seed, device=s.device, n_boot=s.bootstrap, top_k=s.top_k, progress=s.progress)
    except (ConfigError, CacheError) as exc:
        log.error("%s", exc)
        return 2
    print(result.leaderboard)
    print(f"Results: {result.folder}/results.csv, results.json, leaderboard.md, heads/, confusion/, history/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
