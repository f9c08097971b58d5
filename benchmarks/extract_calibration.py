"""Extraction against the best forward pass this machine can give, over batch sizes and threads (issue #12).

For each backbone, side by side in one run, on the first ``--images`` demo digits:
  (a) forward-only throughput (the extractor's own forward step on random tensors) for every batch size
      of 1/4/16/64 and every torch thread count from 1 to the process's: the best of them is the yardstick;
  (b) the setting the calibration (extract/calibration.py) chooses, and what choosing it cost;
  (c) extraction (decode + transform + forward + HDF5) with the chosen setting, and with the old fixed
      default (batch 64, all threads): images/s and their ratio to the best of (a). Goal: (c) >= 0.8 x best;
  (d) decoding alone (load + timm transform, one core): where it is slower than the forward pass, extraction
      is bound by it, whatever the batch size.

    python benchmarks/extract_calibration.py [--backbones efficientnet_lite0 resnet50.a1_in1k] [--image-size 224]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import timm.data
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.extract import ExtractSettings  # noqa: E402
from extract import calibration  # noqa: E402
from extract.backbones import BackboneSpec  # noqa: E402
from extract.dataset import Dataset, default_workers, load_dataset  # noqa: E402
from extract.extractor import _Forward, extract_one  # noqa: E402
from extract.models import Weights, create_backbone, preprocessing  # noqa: E402
from runtime.images import load_rgb  # noqa: E402


def extract_rate(spec, model, weights, data_cfg, size_kwargs, dataset: Dataset, work: Path, batch_size: int | None
                 ) -> float:
    settings = ExtractSettings(data="demo", workdir=work, batch_size=batch_size, force=True, progress=False)
    result = extract_one(spec, lambda: (model, []), weights, data_cfg, size_kwargs, dataset, torch.device("cpu"),
                         settings)
    return result.rows / result.seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet50.a1_in1k"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per forward-only setting")
    args = p.parse_args()
    cores = torch.get_num_threads()
    print(f"{os.cpu_count()} CPU core(s), {cores} torch threads, {default_workers()} decoding worker(s) by default\n")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "xdg")  # a fresh calibration, timed here
        full = load_dataset("demo", workdir=Path(tmp))
        dataset = Dataset(**{**full.__dict__, "samples": full.samples[:args.images]})
        for name in args.backbones:
            spec = BackboneSpec(model=name)
            weights = Weights("random", None, "random")
            data_cfg, size_kwargs = preprocessing(spec, args.image_size)
            model, _ = create_backbone(spec, weights, **size_kwargs)
            runner = _Forward(model, torch.device("cpu"), False, 1)  # as extraction runs it (mixed precision too)
            forward = runner.run
            shape = tuple(data_cfg["input_size"])
            print(f"== {name} @ {shape[-1]} px, {len(dataset.samples)} images, forward {runner.how} ==")
            table = []
            for threads in range(cores, 0, -1):
                for b in calibration.BATCH_SIZES:
                    rate = calibration.throughput(forward, torch.randn(b, *shape), threads, min_seconds=args.seconds)
                    table.append((threads, b, rate))
                    print(f"   (a) forward only, {threads} thread(s), batch {b:3d}: {rate:7.1f} images/s", flush=True)
            best = max(table, key=lambda r: r[2])
            t0 = time.perf_counter()
            # The name extraction looks it up by: extraction below uses this calibration, not a second one.
            chosen = calibration.choose(f"{spec.name}@{shape[-1]}", forward, shape, torch.device("cpu"), default_workers(),
                                        len(dataset.samples), how=runner.how)
            cost = time.perf_counter() - t0
            print(f"   best of (a): batch {best[1]}, {best[0]} thread(s), {best[2]:.1f} images/s")
            print(f"   (b) calibration chose batch {chosen.batch_size}, {chosen.threads} thread(s) in {cost:.1f} s")
            work = Path(tmp) / name
            auto = extract_rate(spec, model, weights, data_cfg, size_kwargs, dataset, work, None)  # calibration cached
            fixed = extract_rate(spec, model, weights, data_cfg, size_kwargs, dataset, work, 64)
            print(f"   (c) extraction, chosen setting: {auto:7.1f} images/s = {auto / best[2]:.2f} x best forward-only"
                  "   (goal >= 0.8)")
            print(f"       extraction, batch 64      : {fixed:7.1f} images/s = {fixed / best[2]:.2f} x best forward-only")
            tf = timm.data.create_transform(**data_cfg, is_training=False)
            with calibration.torch_threads(1):
                t0 = time.perf_counter()
                for s in dataset.samples[:200]:
                    tf(load_rgb(s.path))
                decode = min(200, len(dataset.samples)) / (time.perf_counter() - t0)
            print(f"   (d) decoding alone, one core  : {decode:7.1f} images/s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
