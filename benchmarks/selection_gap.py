"""How optimistic is stage one's selection on a small validation split? (issue #14)

For every cache of a workdir (e.g. the one `benchmarks/real_finetune.py` leaves), train the
probe's whole default grid and choose the head and its epoch two ways:

  (a) single best epoch: each head's best validation epoch, the best head of the grid by it;
  (b) smoothed (the default): each head's validation metric averaged over `smooth_epochs`
      consecutive epochs past warm-up, the grid's head chosen by that average.

Prints, per cache and rule, the chosen head, its best epoch, its validation and test metric
and the gap between them (validation minus test: the selection's optimism), and the mean gap.

    python benchmarks/selection_gap.py WORKDIR [--metric qwk] [--smooth 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache import list_caches, open_cache  # noqa: E402
from configs.probe import load_grid  # noqa: E402
from probe.metrics import fast_metric  # noqa: E402
from probe.pipeline import choose  # noqa: E402
from probe.train import Fit, predict_proba, train_grid  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", type=Path)
    p.add_argument("--metric", default="qwk")
    p.add_argument("--smooth", type=int, default=3)
    args = p.parse_args()
    grid = load_grid()
    gaps: dict[str, list[float]] = {}
    print(f"{'cache':34s} {'rule':10s} {'head':32s} {'epoch':>5s} {'val':>7s} {'test':>7s} {'val-test':>8s}")
    for entry in [e for e in list_caches(args.workdir) if e.complete]:
        with open_cache(entry.path) as fc:
            train, val, test = fc.load("train"), fc.load("val"), fc.load("test")
        for rule, smooth in (("best", 1), ("smoothed", args.smooth)):
            options = grid.train.model_copy(update={"smooth_epochs": smooth})
            trained = train_grid(grid.heads, train, val, len(fc.classes), Fit(metric=args.metric, options=options))
            chosen = trained[choose(trained, args.metric)]
            test_value = fast_metric(args.metric, test.labels, predict_proba(chosen.head, test.features))
            gap = chosen.val_metric - test_value
            gaps.setdefault(rule, []).append(gap)
            print(f"{entry.path.stem:34s} {rule:10s} {chosen.config.name:32s} {chosen.best_epoch:5d} "
                  f"{chosen.val_metric:7.4f} {test_value:7.4f} {gap:+8.4f}")
    for rule, values in gaps.items():
        print(f"mean val-test gap, {rule}: {np.mean(values):+.4f} over {len(values)} cache(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
