"""`extract` as a library call: data, backbones and settings in; one cache per backbone and size out."""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from cache import cache_path
from configs.extract import ExtractSettings
from extract.backbones import load_sets, resolve_backbones
from extract.dataset import Dataset, dataset_for
from extract.extractor import ExtractResult, extract_one
from extract.models import choose_weights, create_backbone, preprocessing
from runtime.device import pick_device
from runtime.locks import exclusive

log = logging.getLogger(__name__)


def extract_features(settings: ExtractSettings, dataset: Dataset | None = None) -> list[ExtractResult]:
    """Run every selected backbone over ``settings.data`` once (per image size) and cache the features.

    ``dataset``: ``dataset_for(settings)`` when the caller has read it already.
    """
    s = settings
    dataset = dataset or dataset_for(s)
    counts = {split: sum(c.values()) for split, c in dataset.counts().items()}
    log.info("Dataset: %d images, %d classes (%s); train %d, val %d, test %d",
             len(dataset.samples), len(dataset.classes), dataset.source, counts["train"], counts["val"], counts["test"])
    specs = resolve_backbones(list(s.backbones), sets=load_sets(s.backbones_file))
    dev = pick_device(s.device)
    if not s.pretrained:
        log.warning("--no-pretrained: every backbone uses RANDOM weights; features say nothing about pretrained quality")
    sizes = list(s.image_size) or [None]
    log.info("Extracting %d backbone(s) x %d size(s) on %s", len(specs), len(sizes), dev)
    results: list[ExtractResult] = []
    outer = tqdm(total=len(specs) * len(sizes), desc="backbones", unit="cache",
                 disable=not s.progress or len(specs) < 2, dynamic_ncols=True)
    for spec in specs:
        weights = choose_weights(spec, pretrained=s.pretrained, weights_dir=s.weights_dir)
        loaded: dict[str, tuple] = {}
        for size in sizes:
            data_cfg, size_kwargs = preprocessing(spec, size)

            def factory(spec=spec, weights=weights, extra=size_kwargs) -> tuple:
                # One model per backbone, shared by the sizes that need no rebuild, built only when a cache needs it.
                tag = repr(sorted(extra.items()))
                if tag not in loaded:
                    loaded.clear()
                    loaded[tag] = create_backbone(spec, weights, **extra)
                return loaded[tag]

            name = cache_path(s.workdir, spec.name, int(data_cfg["input_size"][-1])).name
            # A second process asking for a cache this one builds waits, then reuses it.
            with exclusive(s.workdir, f"cache-{name}", wait=True):
                result = extract_one(spec, factory, weights, data_cfg, size_kwargs, dataset, dev, s)
            log.info("%s@%d: %s in %.2fs -> %s", result.backbone, result.image_size, result.status,
                     result.seconds, result.path)
            results.append(result)
            outer.update(1)
        loaded.clear()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    outer.close()
    return results
