"""`extract` as a library call: data, backbones and settings in; one cache per backbone and size out."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cache import cache_path
from configs.extract import ExtractSettings
from extract.backbones import BackboneSpec, load_sets, resolve_backbones
from extract.dataset import Dataset, dataset_for
from extract.extractor import ExtractResult, extract_one
from extract.models import Weights, choose_weights, create_backbone, preprocessing
from runtime.console import progress
from runtime.device import pick_device
from runtime.locks import exclusive

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """One cache to make: a backbone at one image size (``size`` None: its own)."""

    spec: BackboneSpec
    size: int | None
    weights: Weights
    data_cfg: dict[str, Any]
    size_kwargs: dict[str, Any]

    @property
    def image_size(self) -> int:
        return int(self.data_cfg["input_size"][-1])

    @property
    def name(self) -> str:
        return f"{self.spec.name}@{self.image_size}"

    def cache_path(self, workdir: Path) -> Path:
        return cache_path(workdir, self.spec.name, self.image_size)


def plan_units(settings: ExtractSettings) -> list[Unit]:
    """Every (backbone x image size) the settings ask for, in order, with its weights and preprocessing."""
    specs = resolve_backbones(list(settings.backbones), sets=load_sets(settings.backbones_file))
    units = []
    for spec in specs:
        weights = choose_weights(spec, pretrained=settings.pretrained, weights_dir=settings.weights_dir)
        for size in list(settings.image_size) or [None]:
            data_cfg, size_kwargs = preprocessing(spec, size)
            units.append(Unit(spec, size, weights, data_cfg, size_kwargs))
    return units


def extract_features(settings: ExtractSettings) -> list[ExtractResult]:
    """Run every selected backbone over ``settings.data`` once (per image size) and cache the features:
    in this process, or one job per cache (``settings.executor``; `extract.jobs`)."""
    s = settings
    # The backbones first: a wrong name or backbones file is answered before every image is read and decoded
    # (minutes for a large dataset the first time).
    units = plan_units(s)
    dataset = dataset_for(s)
    counts = {split: sum(c.values()) for split, c in dataset.counts().items()}
    log.info("Dataset: %d images, %d classes (%s); train %d, val %d, test %d",
             len(dataset.samples), len(dataset.classes), dataset.source, counts["train"], counts["val"], counts["test"])
    if not s.pretrained:
        log.warning("--no-pretrained: every backbone uses RANDOM weights; features say nothing about pretrained quality")
    if s.executor != "local":
        from extract.jobs import extract_with_jobs

        return extract_with_jobs(units, dataset, s)
    dev = pick_device(s.device)
    log.info("Extracting %d cache(s) (%d backbone(s)) on %s", len(units), len({u.spec.name for u in units}), dev)
    results: list[ExtractResult] = []
    outer = progress(total=len(units), desc="backbones", unit="cache", enabled=s.progress and len(units) > 1)
    loaded: dict[str, tuple] = {}
    for unit in units:
        if loaded and not next(iter(loaded)).startswith(f"{unit.spec.name}|"):
            loaded.clear()  # the previous backbone is done with: free it before the next one is built
            if dev.type == "cuda":
                torch.cuda.empty_cache()

        def factory(unit: Unit = unit) -> tuple:
            # One model per backbone, shared by the sizes that need no rebuild, built only when a cache needs it.
            tag = f"{unit.spec.name}|{sorted(unit.size_kwargs.items())!r}"
            if tag not in loaded:
                loaded.clear()
                loaded[tag] = create_backbone(unit.spec, unit.weights, **unit.size_kwargs)
            return loaded[tag]

        results.append(extract_unit(unit, factory, dataset, dev, s))
        outer.update(1)
    loaded.clear()
    outer.close()
    return results


def extract_unit(unit: Unit, factory: Callable[[], tuple], dataset: Dataset, device: torch.device,
                 settings: ExtractSettings) -> ExtractResult:
    """Make ``unit``'s cache under its lock: a second process asking for it waits, then reuses it."""
    with exclusive(settings.workdir, f"cache-{unit.cache_path(settings.workdir).name}", wait=True):
        result = extract_one(unit.spec, factory, unit.weights, unit.data_cfg, unit.size_kwargs, dataset, device,
                             settings)
    log.info("%s@%d: %s in %.2fs -> %s", result.backbone, result.image_size, result.status, result.seconds,
             result.path)
    return result
