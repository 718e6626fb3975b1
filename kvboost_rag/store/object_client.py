"""Requests to an object store for :class:`~kvboost_rag.store.object_store.ObjectStore`: the client,
its timeouts, retries and cooldown, and the range reads and listing an entry store needs.

Client: `obstore <https://pypi.org/project/obstore/>`_, chosen over fsspec + s3fs because it is one
wheel with no Python dependencies (s3fs brings many, botocore included) that imports quickly and
was as fast or faster on the PUTs and GETs measured (docs/store.md, "Object storage"). It is
optional (``pip install kvboost-rag[s3]``) and imported only when a URL is opened.

* **Bounded calls**: every request has a connect and a total timeout; network errors and
  throttling (5xx) are retried with exponential backoff within ``retry_budget_s``. A request that
  still fails raises :class:`_Unavailable` and starts a cooldown of ``cooldown_s`` during which
  reads fail at once, so a prompt of many documents does not wait once per document for a dead
  endpoint. A missing object is a :class:`FileNotFoundError`, never a failure.
* **Probe**: a second client with one try and a short timeout, for a HEAD that runs under an
  engine's lock (the generation check of :mod:`~kvboost_rag.store.watch`).

Credentials, region and endpoint come from the standard environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``; plain http is allowed
when that endpoint says ``http://``).
"""
from __future__ import annotations

import json
import os
import struct
import time
from datetime import timedelta
from typing import Any, Dict, List, Optional, Tuple

from kvboost_rag.errors import InvalidConfigError, StoreError
from kvboost_rag.store.entry_format import MAX_HEADER_BYTES, SUFFIX, _layout
from kvboost_rag.store.safe_files import _is_entry_name

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


class _BadConfig(Exception):
    """obstore refused the URL or its configuration; the caller names the store in the error."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class ObjectClient:
    """The obstore clients of one ``url`` (a bucket and prefix) with the store's request rules
    (see the module docstring). ``config`` is passed to obstore (e.g. ``region``)."""

    def __init__(self, url: str, *, connect_timeout_s: float, timeout_s: float, retries: int,
                 retry_budget_s: float, cooldown_s: float, put_attempts: int, config: Dict[str, Any]) -> None:
        self.url = url
        self.cooldown_s = cooldown_s
        self.put_attempts = put_attempts
        self._obs = _obstore()
        client = {"connect_timeout": timedelta(seconds=connect_timeout_s), "timeout": timedelta(seconds=timeout_s)}
        if any(os.environ.get(v, "").lower().startswith("http://") for v in _ENDPOINT_VARS):
            client["allow_http"] = True
        retry = {"max_retries": retries, "retry_timeout": timedelta(seconds=retry_budget_s),
                 "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2), "base": 2}}
        try:
            self._client = self._obs.store.from_url(url, client_options=client, retry_config=retry, **config)
            # HEAD of the generation object runs under the engine's lock: one try, a short timeout.
            probe = dict(client, timeout=timedelta(seconds=min(timeout_s, 2.0)))
            self._probe = self._obs.store.from_url(url, client_options=probe, retry_config={"max_retries": 0}, **config)
        except Exception as exc:  # unknown scheme, bad config key...
            raise _BadConfig(exc) from None
        self._down_until = 0.0

    def call(self, fn: str, *args: Any, read: bool = True, probe: bool = False, **kwargs: Any) -> Any:
        """obstore ``fn`` on this store (``probe``: with the one-try client); FileNotFoundError for a
        missing object, :class:`_Unavailable` for anything else (after obstore's retries), and for
        reads during a cooldown."""
        if read and time.monotonic() < self._down_until:
            raise _Unavailable("object store unavailable (cooling down after an error)")
        try:
            result = getattr(self._obs, fn)(self._probe if probe else self._client, *args, **kwargs)
            if fn == "get":  # the body is read here, inside the same timeout and error handling
                return result.meta, result.bytes()
            if fn == "list":
                return [meta for batch in result for meta in batch]
            return result
        except FileNotFoundError:
            raise
        except Exception as exc:
            self._down_until = time.monotonic() + self.cooldown_s
            raise _Unavailable(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}") from None

    def put(self, path: str, data: bytes) -> None:
        """One whole-object PUT (never multipart), retried ``put_attempts`` times with backoff (a
        PUT is idempotent here); raises the last :class:`_Unavailable` or FileNotFoundError (no
        such bucket) if every attempt failed."""
        error: Optional[Exception] = None
        for attempt in range(max(1, self.put_attempts)):
            if attempt:
                time.sleep(min(2.0, 0.2 * 2 ** attempt))
            try:
                self.call("put", path, data, read=False, use_multipart=False)
                return
            except (_Unavailable, FileNotFoundError) as exc:
                error = exc
        raise error  # type: ignore[misc]

    def read_header(self, path: str) -> Tuple[Dict[str, str], int, Optional[str]]:
        """(metadata, object size, etag) of the entry at ``path`` from range reads; ValueError if
        damaged (the metadata, if it parsed, is attached as ``.metadata``)."""
        meta, buf = self.call("get", path, options={"range": (0, _HEAD_BYTES)})
        size, etag = meta["size"], meta.get("e_tag")
        try:
            return _header(buf, size)[0], size, etag
        except _NeedMore as more:
            buf = bytes(buf) + bytes(self.call("get_range", path, start=len(buf), end=more.end))
            return _header(buf, size)[0], size, etag

    def list_entries(self) -> List[Tuple[str, str, int, float, Optional[str]]]:
        """(key, path, size, last-modified epoch, etag) of every object named like an entry, sorted;
        a StoreError if the prefix cannot be listed."""
        out = []
        try:
            listed = self.call("list", None, read=False, chunk_size=1000)
        except (_Unavailable, FileNotFoundError) as exc:
            raise StoreError(f"cannot list {self.url}: {exc}") from None
        for meta in listed:
            parts = meta["path"].split("/")
            if len(parts) == 2 and _is_entry_name(parts[1], parts[0]):
                out.append((parts[1][: -len(SUFFIX)], meta["path"], int(meta["size"]),
                            meta["last_modified"].timestamp(), meta.get("e_tag")))
        return sorted(out)
