"""Writing a feature cache: resumable, and atomic from a reader's point of view.

Rows are written in order; after each block the number of rows done is stored
and the file flushed, so a killed run resumes at that row. The file carries the
``.partial`` suffix until the last row is in; then ``complete`` is set and it is
renamed, so a reader never mistakes a partial file for a complete one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cache import schema

log = logging.getLogger(__name__)


def resume_point(path: Path, key: dict[str, Any]) -> int:
    """Rows already written in ``path``'s partial file for this ``key`` (0: start afresh)."""
    partial = schema.partial_path(path)
    if not partial.exists():
        return 0
    try:
        with h5py.File(partial, "r") as f:
            if f.attrs.get(schema.ATTR_KEY_HASH) == schema.key_hash(key):
                return int(f.attrs.get(schema.ATTR_ROWS_DONE, 0))
            old = json.loads(f.attrs.get(schema.ATTR_KEY, "{}"))
            log.info("%s: partial file was for another key (%s differ); starting again",
                     partial.name, ", ".join(schema.key_differences(old, key)))
    except (OSError, ValueError) as exc:
        # A kill during an HDF5 metadata write can leave a file h5py cannot open.
        log.warning("%s: partial file unreadable (%s); starting again", partial.name, exc)
    return 0


@dataclass(frozen=True)
class Rows:
    """What each row of a cache is (image id, label, split, augmented view), the class names, and the
    fingerprint of the annotations those came from."""

    classes: Sequence[str]
    ids: Sequence[str]
    labels: np.ndarray
    splits: Sequence[str]
    views: np.ndarray
    annotation_fingerprint: str


class CacheWriter:
    """Appends feature rows to ``<path>.partial`` and publishes ``path`` when done."""

    def __init__(
        self,
        path: Path,
        *,
        key: dict[str, Any],
        rows: Rows,
        feature_dim: int,
        map_shape: tuple[int, ...] | None,
        dtype: str,
        meta: dict[str, Any],
        start_row: int,
    ) -> None:
        self.path = Path(path)
        self.partial = schema.partial_path(self.path)
        self.num_rows = len(rows.ids)
        self.rows_done = start_row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if start_row > 0:
            self.file = h5py.File(self.partial, "r+")
            self.feature_dim = int(self.file[schema.POOLED].shape[1])
            return
        self.feature_dim = feature_dim
        self.partial.unlink(missing_ok=True)
        f = h5py.File(self.partial, "w")
        n = self.num_rows
        f.create_dataset(schema.POOLED, shape=(n, feature_dim), dtype=dtype,
                         chunks=(min(n, max(1, 4096 * 256 // max(feature_dim, 1))), feature_dim))
        if map_shape is not None:
            f.create_dataset(schema.MAPS, shape=(n, *map_shape), dtype="float16", chunks=(1, *map_shape))
        f.create_dataset(schema.LABELS, data=np.asarray(rows.labels, dtype=np.int64))
        f.create_dataset(schema.SPLIT, data=np.asarray([s.encode() for s in rows.splits], dtype="S5"))
        f.create_dataset(schema.IDS, data=list(rows.ids), dtype=h5py.string_dtype("utf-8"))
        f.create_dataset(schema.VIEW, data=np.asarray(rows.views, dtype=np.int16))
        f.attrs[schema.ATTR_KEY] = json.dumps(key, sort_keys=True)
        f.attrs[schema.ATTR_KEY_HASH] = schema.key_hash(key)
        f.attrs[schema.ATTR_CLASSES] = json.dumps(list(rows.classes))
        f.attrs[schema.ATTR_ANNOTATIONS] = rows.annotation_fingerprint
        f.attrs[schema.ATTR_META] = json.dumps(meta, default=str)
        # Key fields also as plain attributes, for h5dump and other tools.
        for name in ("backbone", "model", "weights", "dtype"):
            f.attrs[name] = str(key[name])
        f.attrs["data_config"] = json.dumps(key["data_config"])
        f.attrs["dataset_fingerprint"] = key["dataset"]
        f.attrs[schema.ATTR_ROWS_DONE] = 0
        f.attrs[schema.ATTR_COMPLETE] = False
        f.flush()
        self.file = f

    def write(self, start: int, pooled: np.ndarray, maps: np.ndarray | None = None) -> None:
        """Write rows ``start .. start+len(pooled)`` and record them as done."""
        if start != self.rows_done:
            raise ValueError(f"rows must be written in order: expected row {self.rows_done}, got {start}")
        end = start + len(pooled)
        self.file[schema.POOLED][start:end] = pooled
        if maps is not None:
            self.file[schema.MAPS][start:end] = maps.astype(np.float16, copy=False)
        # Data first, then the counter, then flush: a kill never counts unwritten rows.
        self.file.attrs[schema.ATTR_ROWS_DONE] = end
        self.file.flush()
        self.rows_done = end

    def finish(self, meta_update: dict[str, Any] | None = None) -> Path:
        """Mark complete and publish under the final name."""
        if self.rows_done != self.num_rows:
            raise RuntimeError(f"{self.partial}: {self.rows_done} of {self.num_rows} rows written")
        if meta_update:
            meta = json.loads(self.file.attrs[schema.ATTR_META])
            meta.update(meta_update)
            self.file.attrs[schema.ATTR_META] = json.dumps(meta, default=str)
        self.file.attrs[schema.ATTR_COMPLETE] = True
        self.file.close()
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        """Close without publishing (the partial file stays for a resume)."""
        if self.file.id.valid:
            self.file.close()


def update_annotations(path: Path, rows: Rows) -> None:
    """Rewrite labels, splits and class names of a complete cache in place (features untouched).

    Used when only the split assignment or labels changed (a different ``--fold``):
    the features are still valid, and the forward pass is not paid again. The file
    is marked incomplete while it changes, so a kill leaves it refused, not wrong.
    """
    with h5py.File(path, "r+") as f:
        f.attrs[schema.ATTR_COMPLETE] = False
        f.flush()
        f[schema.LABELS][...] = np.asarray(rows.labels, dtype=np.int64)
        f[schema.SPLIT][...] = np.asarray([s.encode() for s in rows.splits], dtype="S5")
        f.attrs[schema.ATTR_CLASSES] = json.dumps(list(rows.classes))
        f.attrs[schema.ATTR_ANNOTATIONS] = rows.annotation_fingerprint
        f.attrs[schema.ATTR_COMPLETE] = True
