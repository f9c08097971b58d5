"""Nevergrad against random search at the same small budget, on a cheap but real objective (issue #5, a).

The objective: validation accuracy of a probe head (an MLP on cached features of the demo digits,
trained with `probe.train.train_grid`) as a function of learning rate and weight decay (log scales),
dropout, epochs and hidden width (ordered choice) — the same kinds of dimensions as the fine-tune
space. Each optimizer is built as `python -m finetune` builds it (`finetune.search.make_optimizer`),
seeded with the same default point, and runs the same budget over several seeds; printed: the
median (and each seed's) best validation accuracy, and how often each found the better one.

    python benchmarks/search_nevergrad_vs_random.py [--budget 12] [--seeds 5] [--optimizer NGOpt]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nevergrad as ng
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache import list_caches, open_cache  # noqa: E402
from configs.extract import ExtractSettings  # noqa: E402
from configs.probe import GridTraining, HeadConfig  # noqa: E402
from extract.pipeline import extract_features  # noqa: E402
from finetune.search import delegated_name, make_optimizer  # noqa: E402
from probe.train import Fit, train_grid  # noqa: E402

DEFAULT = {"lr": 1e-3, "weight_decay": 1e-2, "dropout": 0.0, "epochs": 10, "hidden": 256}


def space(seed: int) -> ng.p.Dict:
    param = ng.p.Dict(lr=ng.p.Log(lower=1e-5, upper=1.0), weight_decay=ng.p.Log(lower=1e-5, upper=10.0),
                      dropout=ng.p.Scalar(lower=0.0, upper=0.8), epochs=ng.p.Scalar(lower=1, upper=30).set_integer_casting(),
                      hidden=ng.p.TransitionChoice([32, 64, 128, 256, 512]))
    param.random_state = np.random.RandomState(seed)
    return param


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=12)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--optimizer", default="NGOpt")
    p.add_argument("--backbone", default="test_efficientnet.r160_in1k")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    extract_features(ExtractSettings(data="demo", backbones=[args.backbone], workdir=work, pretrained=False,
                                     image_size=[64], workers=0, device="cpu", progress=False))
    with open_cache(list_caches(work)[0].path) as fc:
        train, val = fc.load("train"), fc.load("val")
    fit = Fit(metric="accuracy", options=GridTraining(batch_size=64, warmup_epochs=1, standardize=True))
    calls = [0]

    def accuracy(point: dict) -> float:
        calls[0] += 1
        config = HeadConfig(type="mlp", hidden=(int(point["hidden"]),), lr=float(point["lr"]),
                            weight_decay=float(point["weight_decay"]), dropout=float(point["dropout"]),
                            epochs=int(point["epochs"]), patience=30)
        (trained,) = train_grid([config], train, val, len(fc.classes), fit)
        return trained.val_metric

    results: dict[str, list[float]] = {"nevergrad": [], "random": []}
    delegate = ""
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        for kind in ("nevergrad", "random"):
            opt = make_optimizer(kind, args.optimizer, space(seed), args.budget, 1)
            opt.suggest(DEFAULT)  # both start from the known-good default, as in `finetune`
            best = -1.0
            for _ in range(args.budget):
                candidate = opt.ask()
                if kind == "nevergrad" and not delegate:
                    delegate = delegated_name(opt)
                value = accuracy(candidate.value)
                opt.tell(candidate, -value)
                best = max(best, value)
            results[kind].append(best)
        print(f"  seed {seed}: nevergrad {results['nevergrad'][-1]:.4f}   random {results['random'][-1]:.4f}")
    ng_med, rnd_med = statistics.median(results["nevergrad"]), statistics.median(results["random"])
    wins = sum(a > b for a, b in zip(results["nevergrad"], results["random"]))
    ties = sum(a == b for a, b in zip(results["nevergrad"], results["random"]))
    print(f"\nMLP probe head on {args.backbone} features of the demo digits; budget {args.budget}, {args.seeds} seeds, "
          f"{calls[0]} trainings in {time.perf_counter() - t0:.0f} s")
    print(f"  {args.optimizer} (delegates to {delegate}): median best val accuracy {ng_med:.4f}")
    print(f"  RandomSearch: median best val accuracy {rnd_med:.4f}")
    print(f"  means: {statistics.mean(results['nevergrad']):.4f} vs {statistics.mean(results['random']):.4f}; "
          f"difference of medians {ng_med - rnd_med:+.4f}; Nevergrad better on {wins}, tied on {ties} of {args.seeds} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
