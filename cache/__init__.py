"""The HDF5 feature store shared by every stage: schema, resumable writer, reader."""

from cache.reader import (
    CachedFeatures,
    CacheEntry,
    CacheError,
    FeatureCache,
    check_same_dataset,
    complete_caches,
    dataset_record,
    list_caches,
    names_backbone,
    open_cache,
    read_key,
    select_caches,
)
from cache.schema import cache_path, key_hash, make_key, partial_path

__all__ = [
    "CacheEntry", "CacheError", "CachedFeatures", "FeatureCache", "cache_path", "check_same_dataset", "complete_caches",
    "dataset_record", "key_hash", "list_caches", "make_key", "names_backbone", "open_cache", "partial_path", "read_key",
    "select_caches",
]
