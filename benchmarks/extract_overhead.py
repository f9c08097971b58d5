"""Extraction overhead: the whole extraction from disk into the cache against the pure forward pass.

For one backbone and batch size, side by side in one run:
  (a) the forward pass alone over random tensors already in memory,
  (b) extract_one: decode + timm transform + forward + HDF5 write of the same images.
Prints both times and (b)/(a). Goal (issue #2): <= 1.15 at the demo image size.

    python benchmarks/extract_overhead.py [--backbone resnet10t.c3_in1k] [--image-size 128] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timm.data
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.extract import ExtractSettings  # noqa: E402
from extract.backbones import BackboneSpec  # noqa: E402
from extract.dataset import default_workers, load_dataset  # noqa: E402
from extract.extractor import _Forward, extract_one  # noqa: E402
from extract.models import Weights, create_backbone, preprocessing  # noqa: E402
from runtime.device import pick_device  # noqa: E402
from runtime.images import load_rgb  # noqa: E402


def pure_forward(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device) -> float:
    """The extractor's own forward step (same code, same device transfers) on tensors already in memory."""
    forward = _Forward(model, device, store_maps=False, batch_size=len(batches[0]))
    t0 = time.perf_counter()
    for x in batches:
        forward(x)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet10t.c3_in1k")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    device = pick_device(args.device)
    workers = default_workers() if args.workers is None else args.workers
    spec = BackboneSpec(model=args.backbone)
    weights = Weights("random", None, "random")
    data_cfg, size_kwargs = preprocessing(spec, args.image_size)
    model, _ = create_backbone(spec, weights, **size_kwargs)
    model.to(device)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = load_dataset("demo", workdir=Path(tmp))
        n = len(dataset.samples)
        print(f"{args.backbone} @ {args.image_size}px, batch {args.batch_size}, {n} demo images, "
              f"{workers} decoding worker(s), {torch.get_num_threads()} torch thread(s), device {device}")
        bs, size = args.batch_size, args.image_size
        random_batches = [torch.randn(min(bs, n - i), 3, size, size) for i in range(0, n, bs)]
        # The same images decoded and transformed beforehand: separates pipeline overhead from content effects.
        tf = timm.data.create_transform(**data_cfg, is_training=False)
        images = [tf(load_rgb(s.path)) for s in dataset.samples]
        real_batches = [torch.stack(images[i:i + bs]) for i in range(0, n, bs)]
        pure_forward(model, random_batches[:2], device)  # warm-up
        forward_t, real_t, extract_t = [], [], []
        for _ in range(args.repeats):
            # Interleaved, so drift from neighbouring load hits every side alike.
            forward_t.append(pure_forward(model, random_batches, device))
            real_t.append(pure_forward(model, real_batches, device))
            t0 = time.perf_counter()
            settings = ExtractSettings(data="demo", workdir=Path(tmp), batch_size=args.batch_size, workers=workers,
                                       force=True, progress=False)
            extract_one(spec, lambda: (model, []), weights, data_cfg, size_kwargs, dataset, device, settings)
            extract_t.append(time.perf_counter() - t0)
    a, r, b = statistics.median(forward_t), statistics.median(real_t), statistics.median(extract_t)
    print(f"(a) pure forward, random tensors    : {a:7.2f} s  ({n / a:7.1f} img/s)  runs {[round(t, 2) for t in forward_t]}")
    print(f"(a') pure forward, decoded images   : {r:7.2f} s  ({n / r:7.1f} img/s)  runs {[round(t, 2) for t in real_t]}")
    print(f"(b) extraction, disk -> HDF5 cache  : {b:7.2f} s  ({n / b:7.1f} img/s)  runs {[round(t, 2) for t in extract_t]}")
    print(f"ratio (b)/(a) = {b / a:.3f} median, {min(extract_t) / min(forward_t):.3f} best-of-{args.repeats}"
          f"   (goal <= 1.15);  (b)/(a') = {b / r:.3f} median")
    return 0


if __name__ == "__main__":
    sys.exit(main())
