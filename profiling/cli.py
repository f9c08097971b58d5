"""`python -m profiling`: not built yet (issue #4)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="python -m profiling", description="Not built yet (issue #4).")


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print("python -m profiling: not built yet (issue #4)", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
