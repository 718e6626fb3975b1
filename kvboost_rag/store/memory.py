"""KV stores: where encoded document chunks live between warm time and query time.

The engine talks to any object with the small :class:`KVStore` interface. This module holds the
interface and the in-memory tier (:class:`MemoryStore`, byte budget, LRU eviction). Persistent
tiers (disk directory, quantized entries) implement the same interface elsewhere.

Invariant shared by every store: ``get(key, fingerprint)`` never returns a chunk whose
fingerprint differs from the one asked for, whatever the key says.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterator, Optional, Protocol, runtime_checkable

from kvboost_rag import validate
from kvboost_rag.kv.chunk import KVChunk


@runtime_checkable
class KVStore(Protocol):
    """What the engine needs from a store."""

    def get(self, key: str, fingerprint: str) -> Optional[KVChunk]:
        """The chunk stored under ``key`` if it exists, is intact and was made by ``fingerprint``."""

    def put(self, key: str, chunk: KVChunk) -> int:
        """Store ``chunk`` under ``key`` (idempotent: an existing intact entry may be kept);
        returns the bytes the entry takes in this store (0 when it was not kept)."""

    def contains(self, key: str, fingerprint: str) -> bool:
        """Whether a usable entry exists, without loading its tensors where the tier allows."""

    def texts(self, fingerprint: str) -> Iterator[tuple[str, str]]:
        """``(key, rendered text)`` of every entry made by ``fingerprint`` that recorded its text.

        Used to rebuild automatic document detection in a fresh process."""


class MemoryStore:
    """In-process store with a byte budget and least-recently-used eviction.

    ``max_bytes=None`` means unbounded. A chunk larger than the whole budget is not kept.
    Thread-safe: the engine may be called from worker threads (async integrations).
    """

    def __init__(self, max_bytes: Optional[int] = 4 << 30) -> None:
        self.max_bytes = validate.byte_budget("the memory budget (open_store memory_bytes / MemoryStore max_bytes)",
                                              max_bytes)
        self._entries: "OrderedDict[str, KVChunk]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: str, fingerprint: str) -> Optional[KVChunk]:
        with self._lock:
            chunk = self._entries.get(key)
            if chunk is None or chunk.fingerprint != fingerprint:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return chunk

    def contains(self, key: str, fingerprint: str) -> bool:
        with self._lock:
            chunk = self._entries.get(key)
            return chunk is not None and chunk.fingerprint == fingerprint

    def put(self, key: str, chunk: KVChunk) -> int:
        size = chunk.nbytes
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if self.max_bytes is not None and size > self.max_bytes:
                return 0
            self._entries[key] = chunk
            self._bytes += size
            while self.max_bytes is not None and self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.evictions += 1
        return size

    def texts(self, fingerprint: str) -> Iterator[tuple[str, str]]:
        with self._lock:
            items = [(k, c.text) for k, c in self._entries.items() if c.fingerprint == fingerprint and c.text]
        yield from items

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
