"""`python -m extract`: run frozen backbones over a dataset once and cache their features in HDF5."""

from __future__ import annotations

import argparse
import logging
import sys

from configs.extract import ExtractSettings
from configs.flags import build_parser as settings_parser
from configs.flags import given, verbosity
from configs.layers import resolve, write_resolved
from report.html import write_report
from report.tracking import track
from runtime.console import format_table, setup_logging
from runtime.errors import as_user_error
from runtime.jobs import JobsFailed
from runtime.process import imports_done

log = logging.getLogger("extract")
COLUMNS = ["backbone", "size", "images", "dim", "seconds", "images/s", "status", "weights", "file"]


def build_parser() -> argparse.ArgumentParser:
    return settings_parser(
        ExtractSettings, "python -m extract",
        "Stage one, part 1: run each frozen backbone over the dataset once and cache its features "
        "in WORKDIR/features/<backbone>@<size>.h5 (resumable; reused while its key matches).")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbosity(args))
    try:
        settings = resolve(ExtractSettings, "extract", args.config, given(args))
        settings.apply_environment()
        from extract.dataset import decode_workers, images_for

        images_for(settings)  # a bad --data is reported before torch and timm load (seconds)
        from extract.pipeline import extract_features

        imports_done()

        results = extract_features(settings)
        used = settings.model_copy(update={"workers": decode_workers(settings)})  # the record says what was used
        # after the results, inside the try: a full disk here is the same one-line error as anywhere else
        write_resolved(settings.workdir, "extract", used)
        write_report(settings.workdir)
        track(settings, "extract")
    except JobsFailed as exc:
        print(format_table([r.as_row() for r in exc.results], COLUMNS))
        for line in exc.lines:
            log.error("%s", line)
        log.error("%d of %d cache(s) failed; run the same command again to resume them", len(exc.lines),
                  len(exc.results))
        return 1
    except Exception as exc:
        if (problem := as_user_error(exc)) is None:
            raise  # a bug: keep its traceback
        log.error("%s", problem)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; run the same command again to resume")
        return 130
    print(format_table([r.as_row() for r in results], COLUMNS))
    print(f"\n{len(results)} cache(s) in {settings.workdir / 'features'}; "
          f"dataset summary in {settings.workdir / 'dataset.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
