"""Checksums of cache rows: a row counts as written only when what is on disk matches what was computed.

HDF5 reports some failed writes late or not at all (a full disk surfaces in h5py's ``__dealloc__`` as
"Exception ignored", and the unwritten chunks read back as zeros). So the writer stores a CRC-32 of each
row's bytes beside the row, and a cache is published (or resumed) only up to the rows whose bytes,
read back from a freshly opened file, still match their checksum.
"""

from __future__ import annotations

import zlib

import h5py
import numpy as np

from cache import schema

BLOCK_ROWS = 4096  # rows read back at a time when verifying


def row_checksums(pooled: np.ndarray, maps: np.ndarray | None = None) -> np.ndarray:
    """(N,) uint32: CRC-32 of each row's pooled bytes, then its feature map's (as stored: float16)."""
    pooled = np.ascontiguousarray(pooled)
    out = np.empty(len(pooled), dtype=np.uint32)
    for i, row in enumerate(pooled):
        crc = zlib.crc32(row.tobytes())
        if maps is not None:
            crc = zlib.crc32(np.ascontiguousarray(maps[i], dtype=np.float16).tobytes(), crc)
        out[i] = crc
    return out


def first_bad_row(f: h5py.File, end: int) -> int | None:
    """The first of rows ``0 .. end`` whose stored bytes do not match its checksum; ``None`` if all match."""
    pooled, crcs = f[schema.POOLED], f[schema.ROW_CRC]
    maps = f[schema.MAPS] if schema.MAPS in f else None
    for start in range(0, end, BLOCK_ROWS):
        stop = min(end, start + BLOCK_ROWS)
        got = row_checksums(pooled[start:stop], maps[start:stop] if maps is not None else None)
        bad = np.flatnonzero(got != crcs[start:stop])
        if len(bad):
            return start + int(bad[0])
    return None
