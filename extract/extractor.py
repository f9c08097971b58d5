"""The frozen forward pass: every image once through a backbone, features into the cache.

Decoding runs in DataLoader workers, the forward pass in the main thread, and
HDF5 writes in a background thread, so none of the three waits for the others
longer than it must.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm.data
import torch
from torch import nn
from torch.utils.data import DataLoader

from cache import schema
from cache.reader import open_cache, read_key
from cache.writer import CacheWriter, Rows, resume_point, update_annotations
from configs.extract import ExtractSettings
from extract import calibration
from extract.backbones import BackboneSpec
from extract.dataset import Dataset, decode_workers
from extract.models import Weights, library_versions
from runtime.console import progress
from runtime.device import amp_dtype, autocast, dtype_name, empty_cache, is_out_of_memory, uses_channels_last
from runtime.images import load_rgb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowPlan:
    """What each cache row holds: all images once, then K augmented views of the training images."""

    ids: list[str]
    paths: list[Path]
    labels: np.ndarray
    splits: list[str]
    views: np.ndarray

    @classmethod
    def build(cls, dataset: Dataset, views: int) -> RowPlan:
        samples = list(dataset.samples)
        rows = [(s, 0) for s in samples]
        train = [s for s in samples if s.split == "train"]
        rows += [(s, v) for v in range(1, views + 1) for s in train]
        return cls(
            ids=[s.id for s, _ in rows],
            paths=[s.path for s, _ in rows],
            labels=np.asarray([s.label for s, _ in rows], dtype=np.int64),
            splits=[s.split for s, _ in rows],
            views=np.asarray([v for _, v in rows], dtype=np.int16),
        )

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, dataset: Dataset) -> Rows:
        return Rows(classes=dataset.classes, ids=self.ids, labels=self.labels, splits=self.splits, views=self.views,
                    annotation_fingerprint=dataset.annotation_fingerprint)


class ImageRows(torch.utils.data.Dataset):
    """Rows ``start..`` of a plan as tensors: the eval transform for view 0, the training one for views."""

    def __init__(self, plan: RowPlan, start: int, eval_tf: Callable, train_tf: Callable | None, seed: int) -> None:
        self.plan, self.start, self.eval_tf, self.train_tf, self.seed = plan, start, eval_tf, train_tf, seed

    def __len__(self) -> int:
        return len(self.plan) - self.start

    def __getitem__(self, i: int) -> torch.Tensor:
        row = self.start + i
        image = load_rgb(self.plan.paths[row])
        if self.plan.views[row] == 0 or self.train_tf is None:
            return self.eval_tf(image)
        # Seeded per row, so a resumed run draws the same augmentations as an uninterrupted one.
        row_seed = (self.seed * 1_000_003 + row) % (2**31)
        random.seed(row_seed)
        torch.manual_seed(row_seed)
        return self.train_tf(image)


def feature_map_nchw(model: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
    """The last feature map as (B, C, H, W), whatever layout the model uses.

    Token models (ViT) drop their prefix tokens and fold the patch grid back;
    channels-last models (Swin) are permuted.
    """
    if fmap.ndim == 3:
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        tokens = fmap[:, prefix:]
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if grid is None:
            side = int(round(tokens.shape[1] ** 0.5))
            grid = (side, tokens.shape[1] // side)
        return tokens.reshape(tokens.shape[0], grid[0], grid[1], tokens.shape[2]).permute(0, 3, 1, 2)
    if fmap.ndim == 4 and str(getattr(model, "output_fmt", "NCHW")) in ("NHWC", "Format.NHWC"):
        return fmap.permute(0, 3, 1, 2)
    return fmap


class _Forward:
    """Runs batches through the model, halving the micro-batch on out-of-memory."""

    def __init__(self, model: nn.Module, device: torch.device, store_maps: bool, batch_size: int,
                 amp: bool | None = None) -> None:
        self.model, self.device, self.store_maps, self.micro = model, device, store_maps, batch_size
        # channels-last convolutions are faster on CUDA and on CPUs too (oneDNN): 1.15-1.2x for EfficientNet-B0,
        # ResNet-10t and MobileNetV3 at batch 8-32 on two cores; the same for ViT and ConvNeXt (README, Extraction).
        self.channels_last = uses_channels_last(device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        # Mixed precision: on CUDA by default. On a CPU only when asked (2-2.4x for convolutional backbones with
        # AVX512-BF16): its features differ by ~1% from the float32 forward that stage two and profiling run, and
        # a head chosen on the cache must give the same logits on the model (README, Extraction).
        self.amp = device.type == "cuda" if amp is None else amp
        dtype = amp_dtype(device, self.amp)
        self.precision = dtype_name(dtype or torch.float32)
        # How the forward pass runs: a calibration measured another way is not reused.
        self.how = f"{'channels-last' if self.channels_last else 'contiguous'}, {self.precision}"

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.amp):
            fmap = self.model.forward_features(x)
            pooled = self.model.forward_head(fmap, pre_logits=True)
            maps = feature_map_nchw(self.model, fmap) if self.store_maps else None
        return pooled.float().cpu(), (maps.half().cpu() if maps is not None else None)

    def __call__(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        pooled, maps, i = [], [], 0
        while i < len(batch):
            chunk = batch[i:i + self.micro]
            try:
                p, m = self.run(chunk)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc) or self.micro == 1:
                    raise
                self.micro //= 2
                empty_cache(self.device)
                log.warning("out of memory; batch size halved to %d", self.micro)
                continue
            pooled.append(p)
            maps.append(m)
            i += len(chunk)
        return torch.cat(pooled).numpy(), (torch.cat(maps).numpy() if self.store_maps else None)


class _BackgroundWriter:
    """Feeds a CacheWriter from a thread; errors surface in the caller at the next put or at close."""

    def __init__(self, open_writer: Callable[[np.ndarray, np.ndarray | None], CacheWriter]) -> None:
        self._open = open_writer
        self.writer: CacheWriter | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=8)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True, name="cache-writer")
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue
            start, pooled, maps = item
            try:
                if self.writer is None:
                    self.writer = self._open(pooled, maps)
                self.writer.write(start, pooled, maps)
            except BaseException as exc:  # re-raised in the main thread
                self._error = exc

    def put(self, start: int, pooled: np.ndarray, maps: np.ndarray | None) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((start, pooled, maps))

    def close(self) -> CacheWriter | None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            if self.writer is not None:
                self.writer.close()
            raise self._error
        return self.writer


@dataclass
class ExtractResult:
    backbone: str
    image_size: int
    rows: int
    feature_dim: int
    seconds: float
    path: Path
    status: str  # built, resumed, reused, relabelled
    weights: str

    def as_row(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone, "size": self.image_size, "images": self.rows, "dim": self.feature_dim,
            "seconds": round(self.seconds, 2),
            "images/s": round(self.rows / self.seconds, 1) if self.status in ("built", "resumed") and self.seconds else None,
            "status": self.status, "weights": self.weights, "file": str(self.path),
        }


def check_existing(path: Path, key: dict[str, Any], annotation_fingerprint: str) -> str | None:
    """``reused`` / ``relabel`` when ``path`` can serve ``key``; ``None`` (and a log line why) when not."""
    if not path.exists():
        return None
    old, complete, old_ann = read_key(path)
    if old is None or not complete:
        log.info("%s: incomplete or unreadable; rebuilding", path.name)
        return None
    if old != key:
        log.info("%s: stale cache (%s changed); rebuilding", path.name, ", ".join(schema.key_differences(old, key)))
        return None
    return "reused" if old_ann == annotation_fingerprint else "relabel"


def cache_key(spec: BackboneSpec, weights: Weights, data_cfg: dict[str, Any], size_kwargs: dict[str, Any],
              dataset: Dataset, settings: ExtractSettings) -> dict[str, Any]:
    """What a cache of ``spec`` at this size must have been made with to be reused."""
    s = settings
    return schema.make_key(
        backbone=spec.name, model=spec.model, model_kwargs={**spec.kwargs, **size_kwargs}, weights=weights.tag,
        data_config=data_cfg, dataset=dataset.content_fingerprint,
        annotations=dataset.annotation_fingerprint if s.views else None,
        views=s.views, view_seed=s.seed if s.views else None, store_maps=s.store_maps, dtype=s.dtype,
    )


def extract_one(
    spec: BackboneSpec,
    model_factory: Callable[[], tuple[nn.Module, list[str]]],
    weights: Weights,
    data_cfg: dict[str, Any],
    size_kwargs: dict[str, Any],
    dataset: Dataset,
    device: torch.device,
    settings: ExtractSettings,
) -> ExtractResult:
    """Make sure ``features/<backbone>@<size>.h5`` exists for this key: reuse, relabel, resume or build.
    The caller holds the cache's lock (``extract_features`` does), so two processes never build one file."""
    t0 = time.perf_counter()
    size = int(data_cfg["input_size"][-1])
    s = settings
    views, seed, dtype, store_maps, batch_size = s.views, s.seed, s.dtype, s.store_maps, s.batch_size
    workers = decode_workers(s)
    path = schema.cache_path(s.workdir, spec.name, size)
    key = cache_key(spec, weights, data_cfg, size_kwargs, dataset, s)
    plan = RowPlan.build(dataset, views)
    rows = plan.rows(dataset)
    if s.force:
        path.unlink(missing_ok=True)
        schema.partial_path(path).unlink(missing_ok=True)
    state = check_existing(path, key, dataset.annotation_fingerprint)
    if state is not None:
        if state == "relabel":
            update_annotations(path, rows)
            log.info("%s: labels/splits changed, features still valid; updated in place", path.name)
        with open_cache(path) as fc:
            dim = fc.feature_dim
        return ExtractResult(spec.name, size, len(plan), dim, time.perf_counter() - t0, path,
                             "reused" if state == "reused" else "relabelled", weights.tag)

    start = resume_point(path, key)
    if start:
        log.info("%s: resuming at row %d of %d", path.name, start, len(plan))
    model, untrained = model_factory()
    model.to(device)
    forward = _Forward(model, device, store_maps, batch_size or 1, amp=s.amp)
    if batch_size is None and start >= len(plan):
        batch_size, threads = 1, None  # every row is written already: nothing to run, nothing to measure
    elif batch_size is None:  # measured on this machine, not guessed (extract/calibration.py)
        chosen = calibration.choose(f"{spec.name}@{size}", forward.run, tuple(data_cfg["input_size"]), device,
                                    workers, len(plan) - start, how=forward.how)
        batch_size, threads = chosen.batch_size, chosen.threads
    else:
        threads = None
    eval_tf = timm.data.create_transform(**data_cfg, is_training=False)
    train_tf = timm.data.create_transform(**data_cfg, is_training=True) if views else None
    loader = DataLoader(
        ImageRows(plan, start, eval_tf, train_tf, seed),
        batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if workers else None,
    )
    meta = {"versions": library_versions(), "untrained_modules": untrained, "batch_size": batch_size,
            "torch_threads": threads or torch.get_num_threads(), "decode_workers": workers,
            "params": sum(p.numel() for p in model.parameters()), "weights_source": weights.kind,
            "weights_location": weights.location, "device": str(device), "precision": forward.precision,
            "random_weights": weights.is_random}

    def open_writer(pooled: np.ndarray, maps: np.ndarray | None) -> CacheWriter:
        return CacheWriter(
            path, key=key, rows=rows, feature_dim=pooled.shape[1],
            map_shape=tuple(maps.shape[1:]) if maps is not None else None, dtype=dtype, meta=meta, start_row=start,
        )

    forward.micro = batch_size  # the calibrated (or given) batch, halved on out-of-memory
    sink = _BackgroundWriter(open_writer)
    row = start
    bar = progress(total=len(plan), initial=start, desc=f"{spec.name}@{size}", unit="img", leave=False,
                   enabled=s.progress)
    try:
        with calibration.torch_threads(threads):
            for batch in loader:
                pooled, maps = forward(batch)
                sink.put(row, pooled, maps)  # the writer casts to the storage type (and refuses what overflows it)
                row += len(batch)
                bar.update(len(batch))
    except BaseException:
        bar.close()
        try:
            # Write what was computed, so a resume loses nothing, and release the partial file.
            writer = sink.close()
            if writer is not None:
                writer.close()
        except BaseException:
            pass  # the original error is the one to report
        raise
    bar.close()
    writer = sink.close()
    seconds = time.perf_counter() - t0
    if writer is None:  # every row was already written by an earlier run
        writer = open_writer(np.zeros((0, 1)), None)
    writer.finish({"extract_seconds": seconds})
    return ExtractResult(spec.name, size, len(plan), writer.feature_dim, seconds, path,
                         "resumed" if start else "built", weights.tag)
