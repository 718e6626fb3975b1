"""Memory -> local disk -> object store: :class:`ObjectTieredStore`, what ``open_store("s3://...")``
returns, so every warm worker and query replica shares one store and each replica pays the
network once per document.

* ``get``: memory, then the local :class:`~kvboost_rag.store.disk.DiskStore` cache, then the
  object store; an object-store hit is promoted into memory and written to the local cache byte
  for byte (the object's own bytes, already verified) by a background thread, so the first fetch
  of a document costs its download and checksum only.
* ``put``: the object store first (the shared, durable copy; a failure raises
  :class:`~kvboost_rag.errors.StoreError` and leaves no local copy, so a rerun retries it), then
  memory; the same bytes reach the local cache in the background. :meth:`ObjectTieredStore.flush`
  waits for pending cache writes.
* The local cache has its own byte budget (LRU by file mtime, as any DiskStore) and is written
  without fsync: a torn file there fails its checksum and is fetched again.
* ``generation()`` is the object store's (:mod:`~kvboost_rag.store.watch`): a long-lived engine
  notices documents another machine warmed.
"""
from __future__ import annotations

import hashlib
import logging
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Hashable, Iterator, List, Optional, Tuple, Union

from kvboost_rag.kv.chunk import KVChunk
from kvboost_rag.store.disk import DiskStore, default_store_dir
from kvboost_rag.store.entry_format import _serialize
from kvboost_rag.store.memory import MemoryStore
from kvboost_rag.store.object_store import ObjectStore
from kvboost_rag.store.tiered import TieredStore

__all__ = ["ObjectTieredStore", "open_object_store", "default_cache_dir", "DEFAULT_CACHE_BYTES"]

log = logging.getLogger(__name__)

#: Budget of a replica's local cache of an object store, unless told otherwise.
DEFAULT_CACHE_BYTES = 16 << 30


def default_cache_dir(url: str) -> Path:
    """``<$KVBOOST_RAG_HOME or ~/.cache/kvboost_rag>/object-cache/<bucket-prefix>-<hash>``: one
    dedicated directory per object-store URL, beside (never inside) the default disk store."""
    name = re.sub(r"[^0-9A-Za-z_-]+", "-", url.split("://", 1)[-1]).strip("-")[:48] or "store"
    return default_store_dir().parent / "object-cache" / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


class ObjectTieredStore(TieredStore):
    """Memory tier over a local disk cache over an :class:`~kvboost_rag.store.object_store.ObjectStore`
    (see the module docstring)."""

    def __init__(self, remote: ObjectStore, cache: Optional[DiskStore] = None, memory: Optional[MemoryStore] = None) -> None:
        cache = cache if cache is not None else DiskStore(default_cache_dir(remote.url), kv_bits=remote.kv_bits,
                                                          max_bytes=DEFAULT_CACHE_BYTES, fsync=False)
        super().__init__(memory if memory is not None else MemoryStore(), cache)
        self.remote = remote
        self._writer: Optional[ThreadPoolExecutor] = None
        self._pending: List[Future] = []
        self._pending_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ObjectTieredStore({self.remote!r}, cache={self.disk!r}, memory={self.memory.max_bytes} bytes)"

    @property
    def url(self) -> str:
        return self.remote.url

    @property
    def kv_bits(self) -> int:
        return self.remote.kv_bits

    @property
    def max_bytes(self) -> Optional[int]:
        return self.remote.max_bytes

    def spec(self) -> Dict[str, Any]:
        """Arguments of :func:`open_object_store` that reopen this store (picklable: Ray actors)."""
        return {**self.remote.spec(), "cache_dir": str(self.disk.root), "cache_bytes": self.disk.max_bytes,
                "memory_bytes": self.memory.max_bytes}

    def as_stored(self, chunk: KVChunk) -> KVChunk:
        return self.remote.as_stored(chunk)

    # ------------------------------------------------------------- interface
    def get(self, key: str, fingerprint: str) -> Optional[KVChunk]:
        chunk = self.memory.get(key, fingerprint)
        if chunk is None:
            chunk = self.disk.get(key, fingerprint)
        if chunk is None:
            chunk, data = self.remote.fetch(key, fingerprint)
            if chunk is None:
                return None
            self.memory.put(key, chunk)
            self._cache(key, data)
            return chunk
        self.memory.put(key, chunk)
        return chunk

    def contains(self, key: str, fingerprint: str) -> bool:
        return (self.memory.contains(key, fingerprint) or self.disk.contains(key, fingerprint)
                or self.remote.contains(key, fingerprint))

    def put(self, key: str, chunk: KVChunk) -> int:
        data = _serialize(chunk, self.remote.kv_bits)
        written = self.remote.put_bytes(key, data)  # raises StoreError: nothing kept locally
        self.memory.put(key, self.remote.as_stored(chunk))
        self._cache(key, data)
        return written

    def _cache(self, key: str, data: Union[bytes, bytearray]) -> None:
        """Queue the entry's bytes for the local cache (one background writer thread)."""
        with self._pending_lock:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvboost-object-cache")
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(self._writer.submit(self._write_cache, key, data))

    def flush(self) -> None:
        """Wait until every queued local-cache write is done."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def _write_cache(self, key: str, data: Union[bytes, bytearray]) -> None:
        """The entry's bytes into the local cache (best effort: the object store has them)."""
        disk = self.disk
        try:
            path = disk.path_for(key)
            disk._atomic_write(path, data)
            with disk._lock:
                if disk._approx_bytes is not None:
                    disk._approx_bytes += len(data)
            if disk.max_bytes is not None:
                disk._maybe_evict(keep=path)
        except Exception as exc:  # never raised to anyone: the next read fetches it again
            log.warning("kvboost-rag object store: local cache write of %s failed: %s", key, exc)

    def texts(self, fingerprint: str) -> Iterator[Tuple[str, str]]:
        seen = set()
        for tier in (self.memory, self.disk, self.remote):
            for key, text in tier.texts(fingerprint):
                if key not in seen:
                    seen.add(key)
                    yield key, text

    def generation(self) -> Hashable:
        return self.remote.generation()

    def __len__(self) -> int:
        return len(self.remote)

    def clear(self) -> None:
        self.flush()
        self.memory.clear()
        self.disk.clear()
        self.remote.clear()

    # ------------------------------------------------------------ inspection
    def keys(self) -> Iterator[str]:
        return self.remote.keys()

    def entries(self):
        return self.remote.entries()

    def delete(self, key: str) -> bool:
        with self.memory._lock:
            old = self.memory._entries.pop(key, None)
            if old is not None:
                self.memory._bytes -= old.nbytes
        self.disk.delete(key)
        return self.remote.delete(key)

    def verify(self, *, remove: bool = False) -> List[Tuple[str, str]]:
        """The object store's bad entries, then the local cache's (as ``local cache: reason``)."""
        bad = self.remote.verify(remove=remove)
        return bad + [(k, f"local cache: {r}") for k, r in self.disk.verify(remove=remove)]

    def stale_temp_files(self, older_than_s: Optional[float] = None) -> list:
        return self.disk.stale_temp_files() if older_than_s is None else self.disk.stale_temp_files(older_than_s)

    def remove_stale_temp_files(self) -> int:
        return self.disk.remove_stale_temp_files()

    def stats(self) -> Dict[str, Any]:
        return {"object_store": self.remote.stats(), "local_cache": self.disk.stats(),
                "memory": {"hits": self.memory.hits, "misses": self.memory.misses}}


def open_object_store(url: str, *, kv_bits: Optional[int] = None, max_bytes: Optional[int] = None,
                      memory_bytes: Optional[int] = 1 << 30, cache_dir: Union[str, Path, None] = None,
                      cache_bytes: Optional[int] = DEFAULT_CACHE_BYTES, **options: Any) -> ObjectTieredStore:
    """Memory (``memory_bytes``) -> local disk cache (``cache_dir``, default :func:`default_cache_dir`,
    ``cache_bytes``) -> object store at ``url`` (``max_bytes`` for the whole prefix; ``options``:
    :class:`~kvboost_rag.store.object_store.ObjectStore` timeouts, retries, obstore ``config``)."""
    remote = ObjectStore(url, kv_bits=kv_bits, max_bytes=max_bytes, **options)
    cache = DiskStore(cache_dir if cache_dir is not None else default_cache_dir(remote.url), kv_bits=remote.kv_bits,
                      max_bytes=cache_bytes, fsync=False)
    return ObjectTieredStore(remote, cache, MemoryStore(memory_bytes))
