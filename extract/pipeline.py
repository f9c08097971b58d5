"""`extract` as a library call: data, backbones and settings in; one cache per backbone and size out."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from extract.backbones import load_sets, resolve_backbones
from extract.dataset import load_dataset
from extract.device import pick_device
from extract.extractor import ExtractResult, extract_one
from extract.models import choose_weights, create_backbone, preprocessing

log = logging.getLogger(__name__)


def default_workers() -> int:
    """Decoding workers: one per spare core, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def extract_features(
    *,
    data: str,
    backbones: list[str],
    workdir: Path,
    backbones_file: Path | None = None,
    pretrained: bool = True,
    weights_dir: Path | None = None,
    image_sizes: list[int] | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    dtype: str = "float16",
    store_maps: bool = False,
    views: int = 0,
    seed: int = 0,
    split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
    fold: int | None = None,
    max_unreadable: float = 0.01,
    force: bool = False,
    progress: bool = True,
) -> list[ExtractResult]:
    """Run every selected backbone over ``data`` once (per image size) and cache the features in ``workdir``."""
    workdir = Path(workdir)
    workers = default_workers() if workers is None else workers
    dataset = load_dataset(data, workdir=workdir, seed=seed, split_ratios=tuple(split_ratios), fold=fold,
                           max_unreadable=max_unreadable, workers=max(workers, 1))
    counts = {s: sum(c.values()) for s, c in dataset.counts().items()}
    log.info("Dataset: %d images, %d classes (%s); train %d, val %d, test %d",
             len(dataset.samples), len(dataset.classes), dataset.source, counts["train"], counts["val"], counts["test"])
    specs = resolve_backbones(backbones, sets=load_sets(backbones_file))
    dev = pick_device(device)
    if not pretrained:
        log.warning("--no-pretrained: every backbone uses RANDOM weights; features say nothing about pretrained quality")
    log.info("Extracting %d backbone(s) x %d size(s) on %s", len(specs), len(image_sizes or [None]), dev)
    results: list[ExtractResult] = []
    outer = tqdm(total=len(specs) * len(image_sizes or [None]), desc="backbones", unit="cache",
                 disable=not progress or len(specs) < 2, dynamic_ncols=True)
    for spec in specs:
        weights = choose_weights(spec, pretrained=pretrained, weights_dir=weights_dir)
        loaded: dict[str, tuple] = {}
        for size in image_sizes or [None]:
            data_cfg, size_kwargs = preprocessing(spec, size)

            def factory(spec=spec, weights=weights, extra=size_kwargs) -> tuple:
                # One model per backbone, shared by the sizes that need no rebuild, built only when a cache needs it.
                tag = repr(sorted(extra.items()))
                if tag not in loaded:
                    loaded.clear()
                    loaded[tag] = create_backbone(spec, weights, **extra)
                return loaded[tag]

            result = extract_one(
                spec=spec, model_factory=factory, weights=weights, data_cfg=data_cfg, size_kwargs=size_kwargs,
                dataset=dataset, workdir=workdir, device=dev, batch_size=batch_size, workers=workers, views=views,
                store_maps=store_maps, dtype=dtype, seed=seed, force=force, progress=progress,
            )
            log.info("%s@%d: %s in %.2fs -> %s", result.backbone, result.image_size, result.status,
                     result.seconds, result.path)
            results.append(result)
            outer.update(1)
        loaded.clear()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    outer.close()
    return results
