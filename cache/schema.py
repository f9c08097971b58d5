"""The HDF5 feature cache: dataset and attribute names, file naming, and the cache key.

One file per (backbone, input resolution): ``features/<backbone>@<res>.h5``.
While being written it is ``<backbone>@<res>.h5.partial``; it is renamed to its
final name, with ``complete=True``, only when every row is written.

Rows are ordered: every image once (``view == 0``, sorted by id), then, for
``views=K``, K augmented views of each training image (``view`` 1..K).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

# 2: a CRC-32 per row (ROW_CRC); caches of format 1 cannot be verified and are rebuilt.
FORMAT_VERSION = 2

# Datasets
POOLED = "pooled"  # (N, D) pre-logits features
MAPS = "maps"  # (N, C, H, W) float16 last feature map, optional
LABELS = "labels"  # (N,) int class index
SPLIT = "split"  # (N,) bytes: train / val / test
IDS = "ids"  # (N,) str: path relative to the data root
VIEW = "view"  # (N,) int: 0 plain, 1..K augmented
ROW_CRC = "row_crc"  # (N,) uint32: CRC-32 of each row's stored bytes (pooled, then map), written with the row

# Attributes
ATTR_COMPLETE = "complete"
ATTR_ROWS_DONE = "rows_done"
ATTR_KEY = "key"  # JSON of the cache key
ATTR_KEY_HASH = "key_hash"
ATTR_CLASSES = "classes"  # JSON list of class names
ATTR_ANNOTATIONS = "annotation_fingerprint"
ATTR_META = "meta"  # JSON: library versions, untrained parameters, timings ...

# Key fields; what each one means for whether a cache can be reused.
KEY_FIELDS = (
    "format",  # this file layout
    "backbone",  # display name (== timm name unless the YAML renames it)
    "model",  # timm model name with pretrained tag
    "model_kwargs",  # extra create_model keyword arguments
    "weights",  # pretrained tag, local file hash, or "random"
    "data_config",  # timm's resolved preprocessing: input size, mean, std, interpolation, crop
    "dataset",  # content fingerprint of the image files
    "annotations",  # labels and splits; only when augmented views depend on which images are train
    "views",
    "view_seed",
    "store_maps",
    "dtype",
)


def make_key(**fields: Any) -> dict[str, Any]:
    """The cache key: every field that changes what the file holds."""
    unknown = set(fields) - set(KEY_FIELDS)
    missing = set(KEY_FIELDS) - set(fields) - {"format"}
    if unknown or missing:
        raise TypeError(f"cache key fields: unknown {sorted(unknown)}, missing {sorted(missing)}")
    return {"format": FORMAT_VERSION, **fields}


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def key_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The key fields that differ, for the log line that says why a cache is rebuilt."""
    return [k for k in KEY_FIELDS if old.get(k) != new.get(k)]


def safe_name(backbone: str) -> str:
    """A file-name-safe form of a backbone name (``hf-hub:org/model`` has a slash)."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", backbone)


def cache_path(workdir: Path, backbone: str, image_size: int) -> Path:
    return Path(workdir) / "features" / f"{safe_name(backbone)}@{image_size}.h5"


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")
