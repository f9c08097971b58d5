"""The frozen (head-only) phase of a fine-tune from the feature cache vs through the backbone (issue #5, b).

Both runs are the same trial code (`finetune.trainer.run_trial`) on the same backbone, data, head
and hyperparameters, all epochs head-only; the only difference is `train.frozen_from_cache`:

  (a) through the backbone: every epoch decodes, augments and forwards every training and
      validation image through the frozen backbone;
  (b) from the cache: the head reads the cached pooled features.

Runs are interleaved and repeated; prints the median seconds of each and the speed-up.

    python benchmarks/frozen_phase_cache.py [--backbone resnet10t.c3_in1k] [--image-size 128] [--epochs 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.extract import ExtractSettings  # noqa: E402
from configs.finetune import load_tuning  # noqa: E402
from configs.probe import ProbeSettings  # noqa: E402
from extract.dataset import default_workers  # noqa: E402
from extract.pipeline import extract_features  # noqa: E402
from finetune.data import load_data  # noqa: E402
from finetune.pipeline import select_targets  # noqa: E402
from finetune.trainer import TrialSetup, run_trial  # noqa: E402
from probe.pipeline import run_probe  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet10t.c3_in1k")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workdir", type=Path, help="reuse a workdir (default: a temporary one)")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-frozen-"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workers = default_workers()
    t0 = time.perf_counter()
    extract_features(ExtractSettings(data="demo", backbones=[args.backbone], workdir=work, pretrained=False,
                                     image_size=[args.image_size], workers=workers, device=device.type,
                                     progress=False))
    run_probe(ProbeSettings(workdir=work, device=device.type, bootstrap=100, progress=False))
    print(f"setup (extract + probe): {time.perf_counter() - t0:.1f} s")
    targets, metric = select_targets(work, top=1, backbones=None, metric=None)
    data = load_data(work, targets[0].cache)
    times: dict[str, list[float]] = {"backbone": [], "cache": []}
    metrics: dict[str, float] = {}
    for r in range(args.repeats):
        for mode in ("backbone", "cache"):
            tuning = load_tuning(overlay={"train": {"epochs": args.epochs, "frozen_from_cache": mode == "cache",
                                                "patience": args.epochs + 1},
                                      "defaults": {"frozen_epochs": args.epochs, "last_block_epochs": 0},
                                      "augment": {"hflip": 0.0, "color_jitter": 0.0}})
            t = time.perf_counter()
            setup = TrialSetup(metric=metric, device=device, data_workers=workers)
            outcome = run_trial(targets[0], data, tuning.defaults, tuning, work / "bench" / f"{mode}-{r}", setup)
            times[mode].append(time.perf_counter() - t)
            metrics[mode] = outcome.metric
            print(f"  repeat {r + 1}: {mode:8s} {times[mode][-1]:7.2f} s  (val {metric} {outcome.metric:.4f})")
    a, b = statistics.median(times["backbone"]), statistics.median(times["cache"])
    n = len(data.splits["train"].paths)
    print(f"\n{targets[0].name}, {n} training images, {args.epochs} head-only epochs, {device}:")
    print(f"  (a) through the backbone: {a:.2f} s   (b) from the cache: {b:.2f} s   speed-up (a)/(b) = {a / b:.1f}x")
    print(f"  val {metric}: through the backbone {metrics['backbone']:.4f} (augmented images), "
          f"cache {metrics['cache']:.4f} (un-augmented)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
