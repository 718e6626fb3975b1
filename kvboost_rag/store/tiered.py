"""A memory tier over the disk tier: :class:`TieredStore`, and :func:`open_store`, the usual way for
an engine to get a persistent store.

The disk is written first, so a chunk in memory is always durable; memory then holds exactly what
a later disk read would return (the quantization round trip of the disk's ``kv_bits`` applied), so
a hit gives the same chunk whichever tier served it. Design: docs/store.md.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

from kvboost_rag.errors import InvalidConfigError
from kvboost_rag.kv.chunk import KVChunk
from kvboost_rag.store.disk import DiskStore
from kvboost_rag.store.memory import MemoryStore


class TieredStore:
    """Memory tier over a disk tier: ``get`` tries memory, then disk (promoting the hit into memory);
    ``put`` writes the disk first (durability), then memory with exactly what disk will return."""

    def __init__(self, memory: Optional[MemoryStore] = None, disk: Optional[DiskStore] = None) -> None:
        self.memory = memory if memory is not None else MemoryStore()
        self.disk = disk if disk is not None else DiskStore()

    def __repr__(self) -> str:
        return f"TieredStore(memory={self.memory.max_bytes} bytes, disk={self.disk!r})"

    @property
    def root(self) -> Path:
        return self.disk.root

    @property
    def kv_bits(self) -> int:
        return self.disk.kv_bits

    def get(self, key: str, fingerprint: str) -> Optional[KVChunk]:
        chunk = self.memory.get(key, fingerprint)
        if chunk is not None:
            return chunk
        chunk = self.disk.get(key, fingerprint)
        if chunk is not None:
            self.memory.put(key, chunk)
        return chunk

    def contains(self, key: str, fingerprint: str) -> bool:
        return self.memory.contains(key, fingerprint) or self.disk.contains(key, fingerprint)

    def put(self, key: str, chunk: KVChunk) -> int:
        written = self.disk.put(key, chunk)
        self.memory.put(key, self.disk.as_stored(chunk))
        return written

    def texts(self, fingerprint: str) -> Iterator[Tuple[str, str]]:
        seen = set()
        for key, text in self.memory.texts(fingerprint):
            seen.add(key)
            yield key, text
        for key, text in self.disk.texts(fingerprint):
            if key not in seen:
                yield key, text

    def __len__(self) -> int:
        return len(self.disk)

    def clear(self) -> None:
        self.memory.clear()
        self.disk.clear()


def open_store(
    path: Union[str, os.PathLike, None] = None,
    *,
    kv_bits: Optional[int] = None,
    max_bytes: Optional[int] = None,
    memory_bytes: Optional[int] = 1 << 30,
    **object_options,
) -> TieredStore:
    """A :class:`TieredStore` over ``path`` (default directory if None): the usual way to get a
    persistent store for an engine, e.g. ``KVBoostEngine.from_pretrained(store=open_store())``.

    An object-store URL (``s3://bucket/prefix``, also ``gs://``, ``az://``) gives memory -> local disk
    cache -> object store (:func:`~kvboost_rag.store.object_cache.open_object_store`, which takes
    ``object_options``: ``cache_dir``, ``cache_bytes``, timeouts, retries)."""
    from kvboost_rag.store.object_store import is_store_url

    if is_store_url(path):
        from kvboost_rag.store.object_cache import open_object_store

        return open_object_store(str(path), kv_bits=kv_bits, max_bytes=max_bytes, memory_bytes=memory_bytes,
                                 **object_options)
    if object_options:
        raise InvalidConfigError(f"{', '.join(object_options)}: options of an object-store URL, not of a directory")
    return TieredStore(MemoryStore(memory_bytes), DiskStore(path, max_bytes=max_bytes, kv_bits=kv_bits))
