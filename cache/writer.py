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
from cache.integrity import first_bad_row, row_checksums
from cache.reader import CacheError
from runtime.errors import WriteFailed, write_failed

log = logging.getLogger(__name__)

# Free space kept beyond what a write needs (HDF5 metadata, the checksums, other files of the run).
HEADROOM = 1 << 20


def ensure_room(path: Path, needed: int) -> None:
    """Stop before a write that the file system cannot take.

    HDF5 does not survive running out of space: the failed write surfaces late (or only in h5py's
    ``__dealloc__``), and the library's state afterwards crashes the process. So the space is checked
    first; the checksums catch what slips through (another process filling the disk meanwhile).
    """
    st = os.statvfs(path.parent)
    free = st.f_bavail * st.f_frsize
    if free < needed + HEADROOM:
        raise WriteFailed(f"no space left on device for {path} ({free / 1e6:.1f} MB free, about "
                          f"{(needed + HEADROOM) / 1e6:.1f} MB needed to go on); free space and run the same command "
                          "again — it resumes where it stopped")


def resume_point(path: Path, key: dict[str, Any]) -> int:
    """Rows already written in ``path``'s partial file for this ``key`` and verified against their checksums
    (0: start afresh). The recorded count is a claim, not a fact: rows past the first one whose bytes do not
    match are written again."""
    partial = schema.partial_path(path)
    if not partial.exists():
        return 0
    try:
        with h5py.File(partial, "r") as f:
            if f.attrs.get(schema.ATTR_KEY_HASH) == schema.key_hash(key):
                claimed = int(f.attrs.get(schema.ATTR_ROWS_DONE, 0))
                done = min(max(claimed, 0), len(f[schema.POOLED]))
                bad = first_bad_row(f, done)
                verified = done if bad is None else bad
                if verified != claimed:
                    log.warning("%s: %d rows recorded as written, %d verified; resuming at row %d",
                                partial.name, claimed, verified, verified)
                return verified
            old = json.loads(f.attrs.get(schema.ATTR_KEY, "{}"))
            log.info("%s: partial file was for another key (%s differ); starting again",
                     partial.name, ", ".join(schema.key_differences(old, key)))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        # A kill during an HDF5 metadata write (or a full disk) can leave a file h5py cannot open.
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
        self.ids = list(rows.ids)
        self.rows_done = start_row
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if start_row > 0:
                self.file = h5py.File(self.partial, "r+")
                self.feature_dim = int(self.file[schema.POOLED].shape[1])
            else:
                self.feature_dim = feature_dim
                ensure_room(self.partial, 64 * self.num_rows + len(json.dumps(meta, default=str)))
                self.file = self._create(key, rows, map_shape, dtype, meta)
        except (OSError, RuntimeError) as exc:
            raise write_failed(exc, self.partial) from exc

    def _create(self, key: dict[str, Any], rows: Rows, map_shape: tuple[int, ...] | None, dtype: str,
                meta: dict[str, Any]) -> h5py.File:
        feature_dim = self.feature_dim
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
        f.create_dataset(schema.ROW_CRC, shape=(n,), dtype=np.uint32)
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
        return f

    def write(self, start: int, pooled: np.ndarray, maps: np.ndarray | None = None) -> None:
        """Write rows ``start .. start+len(pooled)`` and record them as done."""
        if start != self.rows_done:
            raise ValueError(f"rows must be written in order: expected row {self.rows_done}, got {start}")
        end = start + len(pooled)
        dataset = self.file[schema.POOLED]
        pooled = self._storable(start, pooled, dataset.dtype, "features", "extract with --dtype float32")
        if maps is not None:
            maps = self._storable(start, maps, np.dtype(np.float16), "feature maps",
                                  "feature maps are stored as float16: extract without --store-maps")
        # A batch may start a new chunk of each dataset: room for whole chunks, twice over.
        chunk = int(np.prod(dataset.chunks)) * dataset.dtype.itemsize
        ensure_room(self.partial, 2 * (chunk + pooled.nbytes + (maps.nbytes if maps is not None else 0)))
        try:
            self.file[schema.POOLED][start:end] = pooled
            if maps is not None:
                self.file[schema.MAPS][start:end] = maps
            self.file[schema.ROW_CRC][start:end] = row_checksums(pooled, maps)
            # Data first, then the counter, then flush: a kill never counts unwritten rows (and resume_point
            # checks the rows it is told about anyway).
            self.file.attrs[schema.ATTR_ROWS_DONE] = end
            self.file.flush()
        except (OSError, RuntimeError) as exc:
            raise write_failed(exc, self.partial) from exc
        self.rows_done = end

    def _storable(self, start: int, values: np.ndarray, dtype: np.dtype, what: str, wider: str) -> np.ndarray:
        """``values`` (a batch of rows from ``start``) as ``dtype``; a :class:`CacheError` that names the image if any
        value is not finite there. A cache never holds NaN or inf: every head, LogME and kNN would turn them into
        scores that look like numbers."""
        with np.errstate(over="ignore"):  # an overflow is found and reported below
            stored = values.astype(dtype, copy=False)
        bad = np.flatnonzero(~np.isfinite(stored).reshape(len(stored), -1).all(1))
        if not len(bad):
            return stored
        image = f"image {self.ids[start + bad[0]]!r}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
        if np.isfinite(values[bad]).all():  # finite as computed, too large for the storage type
            peak = float(np.abs(values[bad]).max())
            raise CacheError(f"{self.path.name}: the {what} of {image} exceed {dtype.name}'s range (largest |value| "
                             f"{peak:.4g}, {dtype.name} holds {float(np.finfo(dtype).max):g}); {wider}")
        raise CacheError(f"{self.path.name}: the model gave NaN or infinite {what} for {image}: its weights or these "
                         "images are broken (a checkpoint with NaN, an image the transform cannot handle)")

    def finish(self, meta_update: dict[str, Any] | None = None) -> Path:
        """Mark complete and publish under the final name."""
        if self.rows_done != self.num_rows:
            raise RuntimeError(f"{self.partial}: {self.rows_done} of {self.num_rows} rows written")
        try:
            if meta_update:
                meta = json.loads(self.file.attrs[schema.ATTR_META])
                meta.update(meta_update)
                self.file.attrs[schema.ATTR_META] = json.dumps(meta, default=str)
            self.file.close()
            _fsync(self.partial)
            # Read back from a freshly opened file (not HDF5's chunk cache): what reached the disk.
            with h5py.File(self.partial, "r") as f:
                bad = first_bad_row(f, self.num_rows)
            if bad is None:
                with h5py.File(self.partial, "r+") as f:
                    f.attrs[schema.ATTR_COMPLETE] = True
                _fsync(self.partial)
                os.replace(self.partial, self.path)
        except (OSError, RuntimeError) as exc:
            raise write_failed(exc, self.partial) from exc
        if bad is not None:
            raise WriteFailed(f"{self.partial}: rows {bad}.. of {self.num_rows} did not reach the disk intact (a full "
                              "disk?); nothing was published. Free space and run the same command again — it "
                              f"resumes at row {bad}")
        return self.path

    def close(self) -> None:
        """Close without publishing (the partial file stays for a resume; its rows are checked then)."""
        if self.file.id.valid:
            try:
                self.file.close()
            except (OSError, RuntimeError) as exc:  # a full disk fails the close too; the partial file is checked
                log.warning("%s: closing after an error failed too (%s)", self.partial.name, exc)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
