"""Object-storage KV tier: :class:`ObjectStore`, one object per entry in a bucket under a prefix
(``s3://bucket/prefix``; ``gs://`` and ``az://`` through the same client, untested).

Client: `obstore <https://pypi.org/project/obstore/>`_, chosen over fsspec + s3fs because it is one
wheel with no Python dependencies (s3fs brings 20 packages, botocore included) that imports in
milliseconds and was as fast or faster on the PUTs and GETs measured (docs/store.md, "Object
storage"). It is optional (``pip install kvboost-rag[s3]``) and imported only when a URL is opened.

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
* **Bounded calls**: every request has a connect and a total timeout; network errors and
  throttling (5xx) are retried with exponential backoff within ``retry_budget_s``. Then a reader
  gets a miss (and the store skips the network for ``cooldown_s``, so a prompt of 8 documents
  does not wait 8 times for a dead endpoint) and a writer a :class:`~kvboost_rag.errors.StoreError`.
* **Generation**: each write or delete also PUTs a small object, :data:`GENERATION_OBJECT`, whose
  ETag :meth:`ObjectStore.generation` reads with one HEAD, so a long-lived engine on another
  machine notices new documents (:mod:`~kvboost_rag.store.watch`).

Credentials, region and endpoint come from the standard environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``; plain http is allowed
when that endpoint says ``http://``). The memory and local-disk tiers in front are
:mod:`~kvboost_rag.store.object_cache`.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import PurePosixPath
from typing import Any, Dict, Hashable, Iterator, List, Optional, Tuple

from kvboost_rag import validate
from kvboost_rag.errors import InvalidConfigError, StoreError
from kvboost_rag.kv.chunk import KVChunk
from kvboost_rag.kv.quantize import check_bits
from kvboost_rag.store.entry_format import (FORMAT, MAX_HEADER_BYTES, SUFFIX, EntryInfo, _as_stored, _deserialize,
                                            _fields, _layout, _serialize, _to_chunk)
from kvboost_rag.store.safe_files import _KEY_RE, _is_entry_name

__all__ = ["ObjectStore", "is_store_url", "GENERATION_OBJECT"]

log = logging.getLogger(__name__)

#: Small object under the prefix that every write/delete replaces; its ETag is the generation.
GENERATION_OBJECT = "kvboost-generation"
_HEAD_BYTES = 64 << 10  # first range read of a header (texts included); a longer header costs a second read
_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")


def is_store_url(store: Any) -> bool:
    """Whether ``store`` names an object store (``s3://``, ``gs://``, ``az://``...) rather than a
    local directory (a plain path or ``file://``)."""
    return isinstance(store, str) and "://" in store and not store.startswith("file://")


def _obstore():
    try:
        import obstore
        import obstore.store
    except ImportError:
        raise InvalidConfigError("an object-store URL needs the obstore package: pip install 'kvboost-rag[s3]'") from None
    return obstore


def _header(buf, size: int) -> Tuple[Dict[str, str], list, int]:
    """(metadata, tensor layout, header length) from the first bytes of an entry of ``size`` bytes;
    ValueError if damaged, or ``_NeedMore`` if ``buf`` stops inside the header."""
    if size < 8 or len(buf) < 8:
        raise ValueError("object shorter than the safetensors length prefix")
    (n,) = struct.unpack("<Q", bytes(buf[:8]))
    if n > min(size - 8, MAX_HEADER_BYTES):
        raise ValueError(f"header length {n} does not fit a {size}-byte object (truncated or not safetensors)")
    if len(buf) < 8 + n:
        raise _NeedMore(8 + n)
    header = json.loads(bytes(buf[8: 8 + n]))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    try:
        metadata, specs = _layout(header, n, size)
    except ValueError as exc:  # a readable header: whether the store wrote it is still known
        exc.metadata = header.get("__metadata__")  # type: ignore[attr-defined]
        raise
    return metadata, specs, n


class _NeedMore(Exception):
    def __init__(self, end: int) -> None:
        self.end = end


class _Unavailable(Exception):
    """The object store did not answer (after retries) or refused the request."""


def _own(metadata: Optional[Dict[str, str]]) -> bool:
    return isinstance(metadata, dict) and metadata.get("format") == FORMAT


class ObjectStore:
    """Persistent KV store in an object store (see the module docstring for the guarantees).

    url: ``s3://bucket/prefix`` (or ``gs://``, ``az://``, ``memory://`` for tests).
    kv_bits: 16, 8 or 4, as :class:`~kvboost_rag.store.disk.DiskStore`.
    max_bytes: budget of the whole prefix; the oldest entries are deleted past it. None = unbounded.
    connect_timeout_s / timeout_s: per request; retries / retry_budget_s: backoff retries of
    network errors and 5xx answers, within that total time; cooldown_s: after a failure, reads are
    misses without a request for this long. ``config`` is passed to obstore (e.g. ``region``).
    """

    def __init__(self, url: str, *, kv_bits: int = 16, max_bytes: Optional[int] = None,
                 connect_timeout_s: float = 2.0, timeout_s: float = 30.0, retries: int = 3,
                 retry_budget_s: float = 10.0, cooldown_s: float = 2.0, put_attempts: int = 2,
                 config: Optional[Dict[str, Any]] = None) -> None:
        if not is_store_url(url):
            raise InvalidConfigError(f"ObjectStore takes an object-store URL such as s3://bucket/prefix, got {url!r}")
        self.url = url.rstrip("/")
        self.kv_bits = check_bits(kv_bits)
        self.max_bytes = validate.byte_budget("the object-store budget (ObjectStore / open_store max_bytes)", max_bytes)
        for name in ("connect_timeout_s", "timeout_s", "retry_budget_s"):
            validate.real(name, locals()[name], minimum=0.001)
        for name in ("retries", "put_attempts"):
            validate.integer(name, locals()[name], minimum=0 if name == "retries" else 1)
        self.options = dict(connect_timeout_s=connect_timeout_s, timeout_s=timeout_s, retries=retries,
                            retry_budget_s=retry_budget_s, cooldown_s=cooldown_s, put_attempts=put_attempts,
                            config=dict(config or {}))
        self._obs = _obstore()
        client = {"connect_timeout": timedelta(seconds=connect_timeout_s), "timeout": timedelta(seconds=timeout_s)}
        if any(os.environ.get(v, "").lower().startswith("http://") for v in _ENDPOINT_VARS):
            client["allow_http"] = True
        retry = {"max_retries": retries, "retry_timeout": timedelta(seconds=retry_budget_s),
                 "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2), "base": 2}}
        try:
            self._client = self._obs.store.from_url(self.url, client_options=client, retry_config=retry, **self.options["config"])
            # HEAD of the generation object runs under the engine's lock: one try, a short timeout.
            probe = dict(client, timeout=timedelta(seconds=min(timeout_s, 2.0)))
            self._probe = self._obs.store.from_url(self.url, client_options=probe, retry_config={"max_retries": 0},
                                                   **self.options["config"])
        except Exception as exc:  # unknown scheme, bad config key...
            raise InvalidConfigError(f"cannot open object store {url!r}: {exc}") from None
        self._lock = threading.Lock()
        self._down_until = 0.0
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

    def _call(self, fn: str, *args: Any, read: bool = True, client: Any = None, **kwargs: Any) -> Any:
        """obstore ``fn`` on this store; FileNotFoundError for a missing object, :class:`_Unavailable`
        for anything else (after obstore's retries), and for reads during a cooldown."""
        if read and time.monotonic() < self._down_until:
            raise _Unavailable("object store unavailable (cooling down after an error)")
        try:
            result = getattr(self._obs, fn)(client or self._client, *args, **kwargs)
            if fn == "get":  # the body is read here, inside the same timeout and error handling
                return result.meta, result.bytes()
            if fn == "list":
                return [meta for batch in result for meta in batch]
            return result
        except FileNotFoundError:
            raise
        except Exception as exc:
            self._down_until = time.monotonic() + self.options["cooldown_s"]
            raise _Unavailable(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}") from None

    def _miss(self, **counts: int) -> None:
        with self._lock:
            self.misses += 1
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def _read_header(self, path: str) -> Tuple[Dict[str, str], int, Optional[str]]:
        """(metadata, object size, etag) of the entry at ``path`` from range reads; ValueError if
        damaged (the metadata, if it parsed, is attached as ``.metadata``)."""
        meta, buf = self._call("get", path, options={"range": (0, _HEAD_BYTES)})
        size, etag = meta["size"], meta.get("e_tag")
        try:
            return _header(buf, size)[0], size, etag
        except _NeedMore as more:
            buf = bytes(buf) + bytes(self._call("get_range", path, start=len(buf), end=more.end))
            return _header(buf, size)[0], size, etag

    def _list(self) -> List[Tuple[str, str, int, float, Optional[str]]]:
        """(key, path, size, last-modified epoch, etag) of every object named like an entry."""
        out = []
        try:
            listed = self._call("list", None, read=False, chunk_size=1000)
        except (_Unavailable, FileNotFoundError) as exc:
            raise StoreError(f"cannot list {self.url}: {exc}") from None
        for meta in listed:
            parts = meta["path"].split("/")
            if len(parts) == 2 and _is_entry_name(parts[1], parts[0]):
                out.append((parts[1][: -len(SUFFIX)], meta["path"], int(meta["size"]),
                            meta["last_modified"].timestamp(), meta.get("e_tag")))
        return sorted(out)

    # ------------------------------------------------------------------ reads
    def fetch(self, key: str, fingerprint: str) -> Tuple[Optional[KVChunk], Optional[bytearray]]:
        """(verified chunk, the object's bytes) for ``key`` by ``fingerprint``, or (None, None)."""
        path = self._path(key)
        try:
            meta, body = self._call("get", path)
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
            metadata, _, etag = self._read_header(path)
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
                metadata = self._read_header(path)[0]
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
            listed = self._list()
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
        path, error = self._path(key), None
        for attempt in range(max(1, self.options["put_attempts"])):
            if attempt:
                time.sleep(min(2.0, 0.2 * 2 ** attempt))
            try:
                self._call("put", path, data, read=False, use_multipart=False)
                error = None
                break
            except (_Unavailable, FileNotFoundError) as exc:  # FileNotFoundError: no such bucket
                error = exc
        if error is not None:
            raise StoreError(f"object store write of {key} to {self.url} failed: {error}")
        with self._lock:
            self.bytes_written += len(data)
            if key in self.corrupt_keys:
                self.corrupt_keys.remove(key)
            if self._approx_bytes is not None:
                self._approx_bytes += len(data)
        self._bump()
        if self.max_bytes is not None:
            self._maybe_evict(keep=key)
        return len(data)

    def _bump(self) -> None:
        """Replace the generation object (best effort: a failure only delays other engines' rescans)."""
        token = f"{time.time():.6f} {socket.gethostname()} {os.getpid()} {secrets.token_hex(8)}".encode()
        try:
            self._call("put", GENERATION_OBJECT, token, read=False, use_multipart=False)
        except Exception as exc:
            log.warning("kvboost-rag object store: generation not bumped: %s", exc)

    def generation(self) -> Hashable:
        """The generation object's ETag (one HEAD, one try, short timeout); the last known value
        while the store is unreachable, so an outage never looks like a change."""
        try:
            meta = self._call("head", GENERATION_OBJECT, client=self._probe)
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
            metadata, _, now_etag = self._read_header(path)
        except FileNotFoundError:
            return False
        except Exception as exc:
            metadata, now_etag = getattr(exc, "metadata", None), None
            if not _own(metadata):
                return False
        if not _own(metadata) or (etag is not None and now_etag is not None and now_etag != etag):
            return False
        try:
            self._call("delete", path, read=False)
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
        for key, *_ in self._list():
            self._delete_own(key)
        self._approx_bytes = None

    # ------------------------------------------------------------- inspection
    def keys(self) -> Iterator[str]:
        for key, *_ in self._list():
            yield key

    def __len__(self) -> int:
        return len(self._list())

    @property
    def nbytes(self) -> int:
        return sum(e[2] for e in self._list())

    def entries(self) -> Iterator[EntryInfo]:
        """Header summary of each readable entry (unreadable ones are skipped; see :meth:`verify`)."""
        for key, path, size, modified, _ in self._list():
            try:
                m = self._read_header(path)[0]
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
        for key, path, _, _, _ in self._list():
            metadata, etag = None, None
            try:
                meta, body = self._call("get", path, read=False)
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
            listed = self._list()
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
