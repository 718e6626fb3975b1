"""Object-storage KV tier: :class:`ObjectStore`, one object per entry in a bucket under a prefix
(``s3://bucket/prefix``; ``gs://`` and ``az://`` through the same client, untested). Requests
(the obstore client, timeouts, retries, cooldown, range reads, listing) are
:mod:`~kvboost_rag.store.object_client`.

Layout and format are the disk store's: ``<prefix>/<key[:2].lower()>/<key>.safetensors``, the
bytes of :func:`~kvboost_rag.store.entry_format._serialize`, so an object and a DiskStore file of
the same entry are interchangeable (copy one to the other's place and it is served). The same
guarantees as :class:`~kvboost_rag.store.disk.DiskStore`, by other means:

* **Complete or absent**: an entry is one PUT of the whole object (never multipart), which the
  object store makes visible atomically; two writers of a key each PUT a valid entry, the last wins.
* **Verified reads**: every object is parsed, its header typed and its checksum checked
  (:mod:`~kvboost_rag.store.entry_format`); a bad, truncated or foreign object is a miss.
* **Never deletes what it did not write**: only objects named like an entry whose header carries
  the store's ``format`` marker are ever deleted (eviction, ``verify(remove=True)``, damage found by
  ``get``); anything else under the prefix is ignored. An object whose header cannot be read is
  left in place (unlike on disk, where only a killed writer leaves partial files).
* **Budget**: ``max_bytes`` is enforced after writes by listing the prefix and deleting the oldest
  entries (by write time: a read never writes, so there is no last-used time).
* **Bounded calls** (:class:`~kvboost_rag.store.object_client.ObjectClient`): a request that fails
  within its timeouts and retries is a miss for a reader (and later reads skip the network for
  ``cooldown_s``) and a :class:`~kvboost_rag.errors.StoreError` for a writer.
* **Generation**: each write or delete also PUTs a small object, :data:`GENERATION_OBJECT`, whose
  ETag :meth:`ObjectStore.generation` reads with one HEAD, so a long-lived engine on another
  machine notices new documents (:mod:`~kvboost_rag.store.watch`).

Credentials, region and endpoint come from the standard ``AWS_*`` environment
(:mod:`~kvboost_rag.store.object_client`). The memory and local-disk tiers in front are
:mod:`~kvboost_rag.store.object_cache`.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath
from typing import Any, Dict, Hashable, Iterator, List, Optional, Tuple

from kvboost_rag import validate
from kvboost_rag.config import DEFAULT_KV_BITS
from kvboost_rag.errors import InvalidConfigError, StoreError
from kvboost_rag.kv.chunk import KVChunk
from kvboost_rag.kv.quantize import check_bits
from kvboost_rag.store.accounting import count_write
from kvboost_rag.store.entry_format import (FORMAT, SUFFIX, EntryInfo, _as_stored, _deserialize, _fields, _serialize,
                                            _to_chunk)
from kvboost_rag.store.object_client import _BadConfig, ObjectClient, _header, _Unavailable, is_store_url
from kvboost_rag.store.safe_files import _KEY_RE

__all__ = ["ObjectStore", "is_store_url", "GENERATION_OBJECT"]

log = logging.getLogger(__name__)

#: Small object under the prefix that every write/delete replaces; its ETag is the generation.
GENERATION_OBJECT = "kvboost-generation"


def _own(metadata: Optional[Dict[str, str]]) -> bool:
    return isinstance(metadata, dict) and metadata.get("format") == FORMAT


class ObjectStore:
    """Persistent KV store in an object store (see the module docstring for the guarantees).

    url: ``s3://bucket/prefix`` (or ``gs://``, ``az://``, ``memory://`` for tests).
    kv_bits: 16, 8 or 4, as :class:`~kvboost_rag.store.disk.DiskStore`; None (default):
        :data:`~kvboost_rag.config.DEFAULT_KV_BITS`. Entries of any kv_bits are readable.
    max_bytes: budget of the whole prefix; the oldest entries are deleted past it. None = unbounded.
    connect_timeout_s / timeout_s: per request; retries / retry_budget_s: backoff retries of
    network errors and 5xx answers, within that total time; cooldown_s: after a failure, reads are
    misses without a request for this long. ``config`` is passed to obstore (e.g. ``region``).
    """

    def __init__(self, url: str, *, kv_bits: Optional[int] = None, max_bytes: Optional[int] = None,
                 connect_timeout_s: float = 2.0, timeout_s: float = 30.0, retries: int = 3,
                 retry_budget_s: float = 10.0, cooldown_s: float = 2.0, put_attempts: int = 2,
                 config: Optional[Dict[str, Any]] = None) -> None:
        if not is_store_url(url):
            raise InvalidConfigError(f"ObjectStore takes an object-store URL such as s3://bucket/prefix, got {url!r}")
        self.url = url.rstrip("/")
        self.kv_bits = check_bits(DEFAULT_KV_BITS if kv_bits is None else kv_bits)
        self.max_bytes = validate.byte_budget("the object-store budget (ObjectStore / open_store max_bytes)", max_bytes)
        for name in ("connect_timeout_s", "timeout_s", "retry_budget_s"):
            validate.real(name, locals()[name], minimum=0.001)
        for name in ("retries", "put_attempts"):
            validate.integer(name, locals()[name], minimum=0 if name == "retries" else 1)
        self.options = dict(connect_timeout_s=connect_timeout_s, timeout_s=timeout_s, retries=retries,
                            retry_budget_s=retry_budget_s, cooldown_s=cooldown_s, put_attempts=put_attempts,
                            config=dict(config or {}))
        try:
            self._client = ObjectClient(self.url, **self.options)
        except _BadConfig as exc:  # unknown scheme, bad config key...
            raise InvalidConfigError(f"cannot open object store {url!r}: {exc.cause}") from None
        self._lock = threading.Lock()
        self._approx_bytes: Optional[int] = None
        self._last_listed = 0.0
        self._headers: Dict[Tuple[str, Optional[str]], Tuple[str, Optional[str]]] = {}  # (key, etag) -> (fp, text)
        self._generation: Hashable = None
        self.hits = self.misses = self.mismatches = self.corrupt = self.evictions = 0
        self.unavailable = self.bytes_written = 0
        self.corrupt_keys: List[str] = []

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r}, kv_bits={self.kv_bits}, max_bytes={self.max_bytes})"

    def spec(self) -> Dict[str, Any]:
        """Constructor arguments: ``ObjectStore(**store.spec())`` reopens it (in a Ray actor, say)."""
        return {"url": self.url, "kv_bits": self.kv_bits, "max_bytes": self.max_bytes, **self.options}

    def __reduce__(self):
        return (_reopen, (self.spec(),))

    # ---------------------------------------------------------------- requests
    def _path(self, key: str) -> str:
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise StoreError(f"invalid store key {key!r}: expected 2-255 characters of [0-9A-Za-z_-]")
        return f"{key[:2].lower()}/{key}{SUFFIX}"

    def _miss(self, **counts: int) -> None:
        with self._lock:
            self.misses += 1
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    # ------------------------------------------------------------------ reads
    def fetch(self, key: str, fingerprint: str) -> Tuple[Optional[KVChunk], Optional[bytearray]]:
        """(verified chunk, the object's bytes) for ``key`` by ``fingerprint``, or (None, None)."""
        path = self._path(key)
        try:
            meta, body = self._client.call("get", path)
            etag, data = meta.get("e_tag"), bytearray(body)
        except FileNotFoundError:
            self._miss()
            return None, None
        except _Unavailable as exc:
            log.warning("kvboost-rag object store: %s unreadable (%s); served as a miss", key, exc)
            self._miss(unavailable=1)
            return None, None
        metadata = None
        try:
            metadata, specs, _ = _header(data, len(data))
            metadata, tensors = _deserialize(metadata, specs, data)
            if metadata["fingerprint"] != fingerprint:
                self._miss(mismatches=1)
                return None, None
            chunk = _to_chunk(metadata, tensors)
        except MemoryError:
            raise
        except Exception as exc:
            own = _own(metadata) or _own(getattr(exc, "metadata", None))
            self._mark_corrupt(key, f"{type(exc).__name__}: {exc}", own, etag)
            self._miss()
            return None, None
        with self._lock:
            self.hits += 1
        return chunk, data

    def get(self, key: str, fingerprint: str) -> Optional[KVChunk]:
        """The verified chunk for ``key`` made by ``fingerprint``, else None (miss)."""
        return self.fetch(key, fingerprint)[0]

    def contains(self, key: str, fingerprint: str) -> bool:
        """Whether an entry by ``fingerprint`` exists with an intact header (range reads only)."""
        path = self._path(key)
        try:
            metadata, _, etag = self._client.read_header(path)
            fields = _fields(metadata)
        except FileNotFoundError:
            return False
        except _Unavailable:
            return False
        except Exception as exc:
            own = _own(getattr(exc, "metadata", None))
            self._mark_corrupt(key, f"unreadable header: {type(exc).__name__}: {exc}", own, None)
            return False
        return fields["fingerprint"] == fingerprint

    def _header_fields(self, key: str, path: str, etag: Optional[str]) -> Optional[Tuple[str, Optional[str]]]:
        """(fingerprint, text or None) of an entry's header, cached by ETag; None if unreadable."""
        cached = self._headers.get((key, etag))
        if cached is None:
            try:
                metadata = self._client.read_header(path)[0]
                fingerprint = _fields(metadata)["fingerprint"]
            except Exception:
                return None  # damage is reported by get/verify, not here
            cached = (fingerprint, metadata.get("text", "") if metadata.get("has_text") == "1" else None)
            self._headers[(key, etag)] = cached
        return cached

    def texts(self, fingerprint: str) -> Iterator[Tuple[str, str]]:
        """``(key, text)`` of entries by ``fingerprint`` that recorded their text (headers only,
        remembered by ETag so a re-scan reads only new entries; empty if the store is unreachable)."""
        try:
            listed = self._client.list_entries()
        except StoreError as exc:
            log.warning("kvboost-rag object store: %s", exc)
            return
        with ThreadPoolExecutor(max_workers=8) as pool:
            fields = list(pool.map(lambda e: self._header_fields(e[0], e[1], e[4]), listed))
        for (key, *_), f in zip(listed, fields):
            if f is not None and f[0] == fingerprint and f[1] is not None:
                yield key, f[1]

    # ----------------------------------------------------------------- writes
    def as_stored(self, chunk: KVChunk) -> KVChunk:
        return _as_stored(chunk, self.kv_bits)

    def put(self, key: str, chunk: KVChunk) -> int:
        """Write ``chunk`` under ``key`` in one PUT; StoreError if the object store refuses it."""
        return self.put_bytes(key, _serialize(chunk, self.kv_bits))

    def put_bytes(self, key: str, data: bytes) -> int:
        """PUT an already serialized entry (retried ``put_attempts`` times with backoff; a PUT is
        idempotent here); returns its size, or raises StoreError."""
        try:
            self._client.put(self._path(key), data)
        except (_Unavailable, FileNotFoundError) as error:  # FileNotFoundError: no such bucket
            raise StoreError(f"object store write of {key} to {self.url} failed: {error}") from None
        count_write(self, key, len(data))
        self._bump()
        if self.max_bytes is not None:
            self._maybe_evict(keep=key)
        return len(data)

    def _bump(self) -> None:
        """Replace the generation object (best effort: a failure only delays other engines' rescans)."""
        token = f"{time.time():.6f} {socket.gethostname()} {os.getpid()} {secrets.token_hex(8)}".encode()
        try:
            self._client.call("put", GENERATION_OBJECT, token, read=False, use_multipart=False)
        except Exception as exc:
            log.warning("kvboost-rag object store: generation not bumped: %s", exc)

    def generation(self) -> Hashable:
        """The generation object's ETag (one HEAD, one try, short timeout); the last known value
        while the store is unreachable, so an outage never looks like a change."""
        try:
            meta = self._client.call("head", GENERATION_OBJECT, probe=True)
            self._generation = (meta.get("e_tag"), meta["last_modified"].timestamp())
        except FileNotFoundError:
            self._generation = None
        except _Unavailable:
            pass
        return self._generation

    # --------------------------------------------------------------- deletion
    def _delete_own(self, key: str, etag: Optional[str] = None) -> bool:
        """Delete ``key``'s object if its header carries the store's format marker (and, given
        ``etag``, it is still the object that was judged); True if deleted."""
        path = self._path(key)
        try:
            metadata, _, now_etag = self._client.read_header(path)
        except FileNotFoundError:
            return False
        except Exception as exc:
            metadata, now_etag = getattr(exc, "metadata", None), None
            if not _own(metadata):
                return False
        if not _own(metadata) or (etag is not None and now_etag is not None and now_etag != etag):
            return False
        try:
            self._client.call("delete", path, read=False)
        except (_Unavailable, FileNotFoundError):
            return False
        self._bump()
        return True

    def _mark_corrupt(self, key: str, reason: str, own: bool, etag: Optional[str]) -> bool:
        with self._lock:
            self.corrupt += 1
            if key not in self.corrupt_keys:
                self.corrupt_keys.append(key)
        log.warning("kvboost-rag object store: corrupt entry %s (%s): %s; it will be recomputed", key, self.url, reason)
        return own and self._delete_own(key, etag)

    def delete(self, key: str) -> bool:
        """Remove the entry of ``key`` if the store wrote it; True if an object was removed."""
        return self._delete_own(key)

    def clear(self) -> None:
        """Remove every entry the store wrote (other objects under the prefix are left alone)."""
        for key, *_ in self._client.list_entries():
            self._delete_own(key)
        self._approx_bytes = None

    # ------------------------------------------------------------- inspection
    def keys(self) -> Iterator[str]:
        for key, *_ in self._client.list_entries():
            yield key

    def __len__(self) -> int:
        return len(self._client.list_entries())

    @property
    def nbytes(self) -> int:
        return sum(e[2] for e in self._client.list_entries())

    def entries(self) -> Iterator[EntryInfo]:
        """Header summary of each readable entry (unreadable ones are skipped; see :meth:`verify`)."""
        for key, path, size, modified, _ in self._client.list_entries():
            try:
                m = self._client.read_header(path)[0]
                f = _fields(m)
            except Exception:
                continue
            yield EntryInfo(key=key, path=PurePosixPath(path), fingerprint=f["fingerprint"],  # type: ignore[arg-type]
                            num_tokens=f["num_tokens"], kv_bits=f["kv_bits"], dtype=f["dtype"], nbytes=size,
                            created=f["created"], last_used=modified, encoding_version=m.get("encoding_version", ""),
                            has_text=m.get("has_text") == "1", encoding=f["encoding"], context=f["context"])

    def verify(self, *, remove: bool = False) -> List[Tuple[str, str]]:
        """Fully check every entry; ``(key, reason)`` of each bad one. ``remove=True`` deletes those
        the store wrote (format marker in a readable header); the rest are left in place."""
        bad = []
        for key, path, _, _, _ in self._client.list_entries():
            metadata, etag = None, None
            try:
                meta, body = self._client.call("get", path, read=False)
                etag, data = meta.get("e_tag"), bytearray(body)
                metadata, specs, _ = _header(data, len(data))
                _to_chunk(*_deserialize(metadata, specs, data))
            except FileNotFoundError:
                continue
            except _Unavailable as exc:
                raise StoreError(f"cannot verify {self.url}: {exc}") from None
            except MemoryError:
                raise
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                own = _own(metadata) or _own(getattr(exc, "metadata", None))
                if remove and not self._mark_corrupt(key, reason, own, etag):
                    reason += " (left in place: not an object this store wrote)"
                bad.append((key, reason))
        return bad

    def stale_temp_files(self, older_than_s: float = 0.0) -> list:
        return []  # an entry is one PUT: no temp objects

    def remove_stale_temp_files(self) -> int:
        return 0

    def stats(self) -> Dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "mismatches": self.mismatches, "corrupt": self.corrupt,
                "evictions": self.evictions, "bytes_written": self.bytes_written, "unavailable": self.unavailable}

    # --------------------------------------------------------------- eviction
    def _maybe_evict(self, keep: str) -> None:
        """Past ``max_bytes``, delete the store's oldest entries (never ``keep``). The prefix is
        listed when this writer's running total says so, or every minute (other writers add too)."""
        with self._lock:
            approx = self._approx_bytes
        if approx is not None and approx <= self.max_bytes and time.monotonic() - self._last_listed < 60:
            return
        try:
            listed = self._client.list_entries()
        except StoreError as exc:
            log.warning("kvboost-rag object store: eviction skipped: %s", exc)
            return
        self._last_listed = time.monotonic()
        total = sum(e[2] for e in listed)
        for key, _, size, _, etag in sorted(listed, key=lambda e: e[3]):
            if total <= self.max_bytes:
                break
            if key != keep and self._delete_own(key, etag):
                total -= size
                with self._lock:
                    self.evictions += 1
        with self._lock:
            self._approx_bytes = total


def _reopen(spec: Dict[str, Any]) -> ObjectStore:
    return ObjectStore(**spec)
