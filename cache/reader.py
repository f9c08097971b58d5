"""Reading feature caches: what the later stages use.

>>> from cache import list_caches, open_cache
>>> for entry in list_caches("runs/x"):
...     with open_cache(entry.path) as fc:
...         train = fc.load("train")            # features (N, D) float32, labels (N,)
...         for x, y in fc.iter_batches("val", rows=4096):   # memory-light
...             ...
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cache import schema
from runtime.errors import UserError


class CacheError(UserError, RuntimeError):
    """A cache is missing, incomplete or unreadable; the message says to run ``extract``."""


@dataclass(frozen=True)
class CachedFeatures:
    features: np.ndarray  # (N, D)
    labels: np.ndarray  # (N,)
    ids: np.ndarray  # (N,) str
    views: np.ndarray  # (N,) 0 = plain image
    maps: np.ndarray | None = None  # (N, C, H, W) when asked for and stored


@dataclass(frozen=True)
class CacheEntry:
    backbone: str
    image_size: int
    path: Path
    complete: bool
    problem: str | None = None  # why a file in features/ is not a cache at all (not HDF5, not written by extract)


class FeatureCache:
    """A complete cache file, open read-only."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            partial = schema.partial_path(self.path)
            hint = " (an interrupted extraction left a .partial file)" if partial.exists() else ""
            raise CacheError(f"{self.path}: no such cache{hint}. Run `python -m extract` for this workdir first.")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise CacheError(f"{self.path}: not a readable HDF5 file ({exc}). Delete it and run `python -m extract` again.") from None
        if not bool(self._file.attrs.get(schema.ATTR_COMPLETE, False)):
            self._file.close()
            raise CacheError(f"{self.path}: incomplete cache. Run `python -m extract` again to finish it.")
        attrs = self._file.attrs
        self.key: dict[str, Any] = json.loads(attrs[schema.ATTR_KEY])
        self.meta: dict[str, Any] = json.loads(attrs.get(schema.ATTR_META, "{}"))
        self.classes: list[str] = json.loads(attrs[schema.ATTR_CLASSES])
        self._split = self._file[schema.SPLIT][...].astype(str)
        self._view = self._file[schema.VIEW][...]

    # --- description
    @property
    def backbone(self) -> str:
        return self.key["backbone"]

    @property
    def model(self) -> str:
        return self.key["model"]

    @property
    def weights(self) -> str:
        return self.key["weights"]

    @property
    def data_config(self) -> dict[str, Any]:
        return self.key["data_config"]

    @property
    def image_size(self) -> int:
        return int(self.key["data_config"]["input_size"][-1])

    @property
    def feature_dim(self) -> int:
        return int(self._file[schema.POOLED].shape[1])

    @property
    def num_rows(self) -> int:
        return int(self._file[schema.POOLED].shape[0])

    @property
    def num_views(self) -> int:
        return int(self.key.get("views", 0))

    @property
    def has_maps(self) -> bool:
        return schema.MAPS in self._file

    @property
    def annotation_fingerprint(self) -> str:
        return str(self._file.attrs.get(schema.ATTR_ANNOTATIONS, ""))

    def split_counts(self) -> dict[str, int]:
        plain = self._view == 0
        return {s: int(np.sum(plain & (self._split == s))) for s in ("train", "val", "test")}

    # --- data
    def rows(self, split: str | None = None, *, views: bool = False) -> np.ndarray:
        """Row indices of ``split`` (all splits when None); augmented views only when ``views``."""
        mask = np.ones(self.num_rows, dtype=bool) if split is None else (self._split == split)
        if not views:
            mask &= self._view == 0
        return np.flatnonzero(mask)

    def load(self, split: str | None = None, *, views: bool = False, maps: bool = False,
             dtype: np.dtype | type = np.float32) -> CachedFeatures:
        """Features and labels of ``split`` as in-memory arrays."""
        idx = self.rows(split, views=views)
        f = self._file
        # One contiguous read, then index in memory: h5py's fancy indexing is slow.
        lo, hi = (int(idx[0]), int(idx[-1]) + 1) if len(idx) else (0, 0)
        pooled = f[schema.POOLED][lo:hi][idx - lo].astype(dtype, copy=False)
        if not np.isfinite(pooled).all():  # written before the writer refused them (a float16 overflow, NaN weights)
            raise CacheError(f"{self.path}: holds NaN or infinite features; extract it again with --force (and "
                             "--dtype float32 if the backbone's features exceed float16's range)")
        fmap = None
        if maps:
            if not self.has_maps:
                raise CacheError(f"{self.path}: no feature maps stored; run `python -m extract --store-maps`.")
            fmap = np.stack([f[schema.MAPS][i] for i in idx]) if len(idx) else np.zeros((0,), np.float16)
        return CachedFeatures(
            features=pooled,
            labels=f[schema.LABELS][...][idx],
            ids=f[schema.IDS].asstr()[...][idx],
            views=self._view[idx],
            maps=fmap,
        )

    def iter_batches(self, split: str | None = None, *, rows: int = 4096, views: bool = False,
                     dtype: np.dtype | type = np.float32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(features, labels) in blocks of at most ``rows``, without loading the split at once."""
        idx = self.rows(split, views=views)
        labels = self._file[schema.LABELS]
        pooled = self._file[schema.POOLED]
        for start in range(0, len(idx), rows):
            block = idx[start:start + rows]
            lo, hi = int(block[0]), int(block[-1]) + 1
            yield pooled[lo:hi][block - lo].astype(dtype, copy=False), labels[lo:hi][block - lo]

    # --- lifetime
    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeatureCache({self.backbone}@{self.image_size}, rows={self.num_rows}, dim={self.feature_dim})"


def open_cache(path: str | Path) -> FeatureCache:
    """Open a complete cache; raises :class:`CacheError` for a missing or partial one."""
    return FeatureCache(path)


def list_caches(workdir: str | Path) -> list[CacheEntry]:
    """Every cache file in ``workdir/features``, complete or not, sorted by name."""
    folder = Path(workdir) / "features"
    entries = []
    for p in sorted(folder.glob("*.h5")) + sorted(folder.glob("*.h5.partial")):
        stem = p.name.removesuffix(".partial").removesuffix(".h5")
        backbone, _, size = stem.rpartition("@")
        complete, problem = False, None
        if p.suffix == ".h5":
            try:
                with h5py.File(p, "r") as f:
                    if schema.ATTR_KEY not in f.attrs or schema.POOLED not in f:
                        problem = "an HDF5 file that `extract` did not write (no cache key or features)"
                    complete = bool(f.attrs.get(schema.ATTR_COMPLETE, False)) and problem is None
                    backbone = str(f.attrs.get("backbone", backbone))
            except OSError:
                problem = "not an HDF5 file (unreadable)"
        entries.append(CacheEntry(backbone=backbone, image_size=int(size) if size.isdigit() else -1, path=p,
                                  complete=complete, problem=problem))
    return entries


def read_key(path: str | Path) -> tuple[dict[str, Any] | None, bool, str]:
    """(key, complete, annotation fingerprint) of a cache file, or (None, False, "") if unreadable."""
    try:
        with h5py.File(path, "r") as f:
            return (json.loads(f.attrs[schema.ATTR_KEY]), bool(f.attrs.get(schema.ATTR_COMPLETE, False)),
                    str(f.attrs.get(schema.ATTR_ANNOTATIONS, "")))
    except (OSError, KeyError, ValueError):
        return None, False, ""


RECORD_FIELDS = ("root", "content_fingerprint", "annotation_fingerprint", "classes")


def dataset_record(workdir: str | Path) -> dict[str, Any]:
    """The workdir's ``dataset.json`` (written by extract), checked; one clear error when it is missing,
    not JSON, or edited so that a field the stages need is gone."""
    record = Path(workdir) / "dataset.json"
    fix = f"run `python -m extract --workdir {workdir}` with the workdir's --data to rewrite it"
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheError(f"{record}: missing; {fix}") from None
    except (OSError, ValueError) as exc:
        raise CacheError(f"{record}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0]}); {fix}") from None
    missing = [k for k in RECORD_FIELDS if not isinstance(data, dict) or not data.get(k)]
    if missing:
        raise CacheError(f"{record}: no {', '.join(missing)} (edited by hand?); {fix}")
    return data


def check_same_dataset(workdir: str | Path, paths: list[Path]) -> None:
    """Refuse caches that were not extracted from the workdir's dataset (``dataset.json``): another
    ``--data``, another split (``--seed``, ``--fold``), or a file dropped into ``features/`` by hand.
    Ranking them side by side would compare numbers measured on different images."""
    record = Path(workdir) / "dataset.json"
    dataset = dataset_record(workdir)
    content, annotations = dataset["content_fingerprint"], dataset["annotation_fingerprint"]
    missing = [p.name for p in paths if not p.exists()]
    if missing:  # named by the probe's results (a later stage), then deleted or moved
        raise CacheError(f"cache(s) {', '.join(missing)} missing from {Path(workdir) / 'features'}. Run `python -m "
                         "extract` again for them (then `python -m probe`), or choose other backbones")
    problems = []
    for path in paths:
        key, _, cache_annotations = read_key(path)
        if key is None:
            problems.append(f"{path.name}: not a readable feature cache")
        elif key.get("dataset") != content:
            problems.append(f"{path.name}: extracted from other images than {record.name} records")
        elif cache_annotations != annotations:
            problems.append(f"{path.name}: labels or split differ from {record.name} (another --seed, --fold or "
                            "annotation file)")
    if problems:
        raise CacheError("caches that do not belong to this workdir's dataset: " + "; ".join(problems) +
                         f". Run `python -m extract` with this workdir's --data, --seed and --fold (it rebuilds or "
                         f"relabels them), or move these files out of {Path(workdir) / 'features'}")


def names_backbone(item: str, backbone: str, image_size: int) -> bool:
    """Whether one ``--backbones`` item of a later stage names this cached backbone: its name
    (``resnet50.a1_in1k``), the name without its pretrained tag as extract takes it (``resnet50``; not
    ``resnet50_cbam.a1_in1k``), either with the size (``resnet50@224``), or a pattern of these (``'convnext_*'``)."""
    names = [backbone, f"{backbone}@{image_size}"]
    if "." not in item:  # an untagged item names the architecture, whatever weights the cache was made with
        architecture = backbone.split(".")[0]
        names += [architecture, f"{architecture}@{image_size}"]
    return any(fnmatch.fnmatchcase(name, item) for name in names)


def select_caches(workdir: str | Path, backbones: list[str] | None) -> list[Path]:
    """Complete caches of ``workdir`` matching ``backbones`` (names or patterns); clear errors otherwise."""
    entries = list_caches(workdir)
    if not entries:
        raise CacheError(f"no feature caches in {Path(workdir) / 'features'}. "
                         f"Run `python -m extract --data PATH|demo --workdir {workdir}` first.")
    if backbones:
        chosen = [e for e in entries if any(names_backbone(b, e.backbone, e.image_size) for b in backbones)]
        if not chosen:
            names = sorted({e.backbone for e in entries})
            raise CacheError(f"--backbones {','.join(backbones)} matches no cache in {workdir}; cached: {', '.join(names)}. "
                             "Run `python -m extract` for the backbones you want.")
    else:
        chosen = entries
    foreign = [f"{e.path.name} ({e.problem})" for e in chosen if e.problem]
    if foreign:
        raise CacheError(f"not feature caches: {'; '.join(foreign)}. Move them out of {Path(workdir) / 'features'}; "
                         "`python -m extract` writes the caches there")
    incomplete = [e.path.name for e in chosen if not e.complete]
    if incomplete:
        raise CacheError(f"incomplete cache(s) {', '.join(incomplete)} (an extraction was interrupted). "
                         f"Run `python -m extract` again with the same options to finish them, or leave them out with --backbones.")
    paths = [e.path for e in chosen]
    check_same_dataset(workdir, paths)
    return paths


def complete_caches(workdir: str | Path) -> list[Path]:
    """The complete caches of ``workdir`` (interrupted ones left out), checked to be of its dataset."""
    paths = [e.path for e in list_caches(workdir) if e.complete]
    check_same_dataset(workdir, paths)
    return paths
