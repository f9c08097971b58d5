"""What a fine-tune reads: the images of each split (as `extract` recorded them) and the cached features.

The cache's ``ids`` are paths relative to the dataset root in ``dataset.json``, so
stage two trains on exactly the images, labels and splits stage one used.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm.data
import torch
import torchvision
from PIL import Image

from cache import CacheError, dataset_record, open_cache
from configs.finetune import Augment
from configs.settings import ConfigError
from runtime.images import load_rgb


@dataclass(frozen=True)
class Split:
    paths: list[Path]
    labels: np.ndarray
    ids: list[str]


@dataclass
class FinetuneData:
    """Images of train/val/test, and the cache's pooled features of train (with views) and val."""

    classes: list[str]
    splits: dict[str, Split]
    train_features: np.ndarray
    train_labels: np.ndarray
    val_features: np.ndarray
    val_labels: np.ndarray


def load_data(workdir: Path, cache_path: Path) -> FinetuneData:
    """Images and features for one cache; clear errors when the data moved or the labels changed."""
    record_path = Path(workdir) / "dataset.json"
    record = dataset_record(workdir)
    root = Path(record["root"])
    with open_cache(cache_path) as fc:
        if fc.annotation_fingerprint and record.get("annotation_fingerprint") not in (None, fc.annotation_fingerprint):
            raise CacheError(f"{cache_path.name}: its labels/splits differ from {record_path} (extract ran again with "
                             "other data or --fold). Run `python -m extract` and `python -m probe` again first.")
        splits = {}
        for name in ("train", "val", "test"):
            part = fc.load(name)
            splits[name] = Split([root / i for i in part.ids], part.labels.astype(np.int64), [str(i) for i in part.ids])
        train = fc.load("train", views=fc.num_views > 0)
        val = fc.load("val")
        classes = list(fc.classes)
    missing = [str(p) for s in splits.values() for p in s.paths if not p.is_file()]
    if missing:
        raise CacheError(f"{len(missing)} image(s) recorded in {cache_path.name} are gone, e.g. {missing[:2]}; "
                         f"fine-tuning needs the images under {root}. Restore them or run `python -m extract` again.")
    return FinetuneData(classes, splits, train.features, train.labels.astype(np.int64), val.features,
                        val.labels.astype(np.int64))


class EvalRegion:
    """Crop an image to the region its evaluation view shows, at the image's own resolution.

    The cache (and so the stage-one head) saw timm's evaluation view: for ``crop_mode`` center, the
    middle ``crop_pct`` of each side. Training crops drawn from the whole image show what that head
    never saw; on images whose borders carry no signal but look alike (inspection images: a cell's
    frame, a slide's edge), the head reads those borders as evidence. Measured on ELPV with
    EfficientNet-Lite0's probe head: the whole image gave a validation loss of 14.4 against 0.89 for
    the evaluation view, a crop shifted 16 px of 300 towards one border 2.1-3.2, and one epoch of
    training on such crops took validation QWK from 0.70 to 0.45. Crops from inside the region only
    zoom and move within what the head knows.
    """

    def __init__(self, data_cfg: dict[str, Any]) -> None:
        _, self.height, self.width = data_cfg["input_size"]
        # squash and border views show the whole image (resized or padded)
        self.crop_pct = data_cfg["crop_pct"] if data_cfg.get("crop_mode", "center") == "center" else 1.0

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.crop_pct >= 1.0:
            return image
        # timm resizes so that the image covers floor(size / crop_pct) and takes the centre (size)
        factor = max(math.floor(self.height / self.crop_pct) / image.height,
                     math.floor(self.width / self.crop_pct) / image.width)
        h, w = min(image.height, round(self.height / factor)), min(image.width, round(self.width / factor))
        top, left = (image.height - h) // 2, (image.width - w) // 2
        return image.crop((left, top, left + w, top + h))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(crop_pct={self.crop_pct})"


def train_transform(data_cfg: dict[str, Any], augment: Augment) -> Callable:
    """timm's training transform for the backbone's own preprocessing, with the dataset's overrides,
    drawn from inside the evaluation view's region (`EvalRegion`): ``augment.scale`` is the crop's
    area relative to that region."""
    timm_tf = timm.data.create_transform(
        input_size=tuple(data_cfg["input_size"]), is_training=True, interpolation=data_cfg["interpolation"],
        mean=tuple(data_cfg["mean"]), std=tuple(data_cfg["std"]), hflip=augment.hflip, vflip=augment.vflip,
        color_jitter=augment.color_jitter, auto_augment=augment.auto_augment, re_prob=augment.re_prob,
        scale=tuple(augment.scale), ratio=tuple(augment.ratio))
    return torchvision.transforms.Compose([EvalRegion(data_cfg), *timm_tf.transforms])


def check_augment(data_cfg: dict[str, Any], augment: Augment) -> None:
    """Build the training transform once: options timm refuses (an unknown ``auto_augment`` policy) are a
    configuration error before any trial, not a crash recorded as every trial's failure."""
    try:
        train_transform(data_cfg, augment)
    except Exception as exc:
        raise ConfigError(f"augment: timm cannot build the training transform from {augment.plain()} "
                          f"({type(exc).__name__}: {exc})") from None


def eval_transform(data_cfg: dict[str, Any]) -> Callable:
    return timm.data.create_transform(**data_cfg, is_training=False)


class ImageSet(torch.utils.data.Dataset):
    """(image tensor, label) pairs of one split."""

    def __init__(self, split: Split, transform: Callable) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_rgb(self.split.paths[i])), int(self.split.labels[i])


def seed_worker(worker_id: int) -> None:
    """Augmentations in loader workers follow the loader's seed (timm's transforms use ``random``)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def image_loader(split: Split, transform: Callable, *, batch_size: int, shuffle: bool, workers: int, seed: int,
                 pin_memory: bool) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        ImageSet(split, transform), batch_size=batch_size, shuffle=shuffle, num_workers=workers,
        pin_memory=pin_memory, drop_last=False, generator=generator, worker_init_fn=seed_worker,
        persistent_workers=False, prefetch_factor=4 if workers else None)
