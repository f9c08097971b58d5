"""`python -m probe`: train uniform heads on the cached features, rank the backbones."""

from __future__ import annotations

import argparse
import logging
import sys

from cache import select_caches
from configs.flags import build_parser as settings_parser
from configs.flags import given, verbosity
from configs.layers import resolve, write_resolved
from configs.probe import ProbeSettings, load_grid
from probe.results import read_results
from report.html import write_report
from report.tracking import track
from runtime.console import setup_logging
from runtime.errors import as_user_error
from runtime.process import imports_done

log = logging.getLogger("probe")


def build_parser() -> argparse.ArgumentParser:
    return settings_parser(
        ProbeSettings, "python -m probe",
        "Stage one, part 2: train heads on the cached features of every backbone in WORKDIR, choose the best "
        "head per backbone on validation, test it once, and rank the backbones.")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbosity(args))
    try:
        settings = resolve(ProbeSettings, "probe", args.config, given(args))
        settings.apply_environment()
        # What the run reads is checked before torch and matplotlib load (seconds): a workdir without caches,
        # a bad grid file or no results to re-render is a one-line answer at once.
        if settings.report_only:
            read_results(settings.workdir, f"Run `python -m probe --workdir {settings.workdir}` first.")
        else:
            load_grid(settings.grid_file)
            select_caches(settings.workdir, list(settings.backbones))
        from probe.pipeline import refresh_leaderboard, run_probe  # torch and matplotlib load only for work

        imports_done()

        if settings.report_only:
            print(refresh_leaderboard(settings.workdir).leaderboard)
            write_report(settings.workdir)
            return 0
        result = run_probe(settings)
        # The record says what was used: the selection metric as resolved, not "the default". After the results,
        # inside the try: a full disk here is the same one-line error as anywhere else.
        write_resolved(settings.workdir, "probe", settings.model_copy(update={"metric": settings.selection_metric}))
        write_report(settings.workdir)
        track(settings, "probe")
    except Exception as exc:
        if (problem := as_user_error(exc)) is None:
            raise  # a bug: keep its traceback
        log.error("%s", problem)
        return 2
    except KeyboardInterrupt:
        log.error("Interrupted; the probe results of the last complete run are unchanged (a run publishes all at once)")
        return 130
    print(result.leaderboard)
    print(f"Results: {result.folder}/results.csv, results.json, leaderboard.md, heads/, confusion/, history/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
