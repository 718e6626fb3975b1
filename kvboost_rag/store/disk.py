"""Persistent KV tier: one safetensors file per chunk in a local directory.

Layout: ``<root>/<key[:2]>/<key>.safetensors`` (sharded by the key's first two characters so no
directory grows past a few thousand files). Default root: ``$KVBOOST_RAG_HOME/store`` if that
variable is set, else ``~/.cache/kvboost_rag/store``.

Why it is safe to crash, to run two writers, and to read while writing:

* **No pickle**: safetensors holds raw tensors plus a string->string header, nothing executable.
* **Atomic writes**: each entry is written to a temp file in the *same* directory, flushed and
  fsynced, then ``os.replace``-d over the final name, and the directory is fsynced. A reader sees
  either no file, the old file, or the complete new one, never a prefix. Two processes writing
  the same key both produce complete files; the last rename wins and both are valid.
* **Checksum**: a 128-bit XXH3 over every tensor's name, dtype, shape and bytes *and* over the
  other header fields is stored in the header. A truncated or bit-flipped entry fails it (or fails
  to parse): it is then a miss, counted in ``corrupt``, logged, listed in ``corrupt_keys``, removed
  so that the next warm or use recomputes it, and never served. XXH3 detects damage, not
  tampering (the store is trusted like any cache directory); it hashes ~25 GB/s where sha256 did
  ~1.5, which took an 8-document fetch (page cache warm) from ~140 to ~40 ms. Entries written with the earlier
  ``sha256`` field are still verified with sha256.
* **Model isolation**: the header records the model fingerprint; an entry made by another model is
  never returned (``get`` -> None, ``contains`` -> False), whatever the key.

* **Never touches what it did not write**: a directory holding anything but shard folders at its
  top level (a model folder, ``--store`` pointed at the wrong place) is refused with a
  :class:`~kvboost_rag.errors.StoreError`. Eviction, ``clear``, corruption removal and
  ``inspect --repair`` delete only :meth:`DiskStore._wrote` files: named and placed like an entry,
  regular (symlinks are never followed) and marked ``format=kvboost-rag-kv/1`` in their header.
* **One bad file is a miss**: an entry path that is a directory, FIFO, symlink, unreadable, padded
  to 20 GB or whose header fields have wrong types is a miss for ``get``/``contains`` and a named
  bad entry in ``verify``; files are opened non-blocking and their size must match what the
  header describes before the body is read (:func:`_read_entry`).
* **Temp files of killed writers** carry host and pid in their name and are removed on the next
  open once that pid is gone (or after an hour untouched); a live writer's are never touched.

``contains`` reads only the header (and checks that the file length matches it, which catches
truncation); full checksum verification happens on ``get`` and in :meth:`DiskStore.verify`.

Header fields (strings): format, fingerprint, encoding_version, num_tokens, start, dtype, shape,
kv_bits, created, last_used (= created; the live last-used time is the file's mtime, refreshed with
``os.utime`` on every hit so LRU eviction never rewrites an entry), text, meta (JSON of
``chunk.meta``), xxh3_128 (or sha256 in older entries). Token ids are an ``int32`` tensor in the
file, not header text.

``get`` reads a file once into a private buffer, verifies it there and returns tensors that are
views of that buffer (no second copy, no memory map that another process could truncate).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
import xxhash
from safetensors.torch import save as st_save

from kvboost_rag.kv.chunk import KVChunk
from kvboost_rag.errors import InvalidConfigError, StoreError
from kvboost_rag.files import fsync_dir
from kvboost_rag.kv.quantize import check_bits, dequantize_kv, quantize_kv, roundtrip_kv
from kvboost_rag.store.memory import MemoryStore

log = logging.getLogger(__name__)

FORMAT = "kvboost-rag-kv/1"
SUFFIX = ".safetensors"
_KEY_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z_\-]{1,254}")
#: Shard folder names: ``key[:2].lower()``. The only thing the store ever puts in its root.
_SHARD_RE = re.compile(r"[0-9a-z][0-9a-z_\-]")
#: Temp file of an atomic write: ``.<key>.safetensors.<host>.<pid>.<random>.tmp`` (files written
#: before the host was recorded lack it; they are cleaned by age only).
_TEMP_RE = re.compile(r"\.[0-9A-Za-z][0-9A-Za-z_\-]{1,254}\.safetensors\.(?:(?P<host>[0-9A-Za-z-]{1,63})\.)?"
                      r"(?P<pid>[0-9]{1,10})\.[0-9a-f]{8}\.tmp")
_HOST = re.sub(r"[^0-9A-Za-z-]", "-", socket.gethostname())[:63] or "host"
#: A temp file untouched this long is abandoned whoever wrote it (a live write keeps touching
#: its file and renames it within seconds); younger ones are removed only if their writer is dead.
STALE_TEMP_AGE_S = 3600.0


def _is_entry_name(name: str, shard: str) -> bool:
    """Whether ``shard/name`` is exactly where the store would put an entry: ``<key>.safetensors``
    in the folder ``key[:2].lower()``."""
    key = name[: -len(SUFFIX)]
    return name.endswith(SUFFIX) and _KEY_RE.fullmatch(key) is not None and key[:2].lower() == shard


def _pid_alive(pid: int) -> bool:
    """False only when ``pid`` certainly no longer exists on this host (ESRCH)."""
    if os.name != "posix":
        return True  # no signal-0 probe: age alone decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # EPERM: alive, owned by someone else
    return True


def default_store_dir() -> Path:
    """``$KVBOOST_RAG_HOME/store`` if set, else ``~/.cache/kvboost_rag/store``."""
    home = os.environ.get("KVBOOST_RAG_HOME")
    base = Path(home).expanduser() if home else Path("~/.cache/kvboost_rag").expanduser()
    return base / "store"


@dataclass
class EntryInfo:
    """What the header of one entry says (no tensors loaded)."""

    key: str
    path: Path
    fingerprint: str
    num_tokens: int
    kv_bits: int
    dtype: str
    nbytes: int
    created: float
    last_used: float
    encoding_version: str
    has_text: bool


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


#: Checksum header field -> hash constructor. New entries use the first; the others are read.
_CHECKSUMS = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
_WRITE_CHECKSUM = "xxh3_128"


def _checksum(metadata: Dict[str, str], pieces: List[tuple], field: str) -> str:
    """Hash (named by ``field``) over the header fields except checksums, and each tensor by name."""
    h = _CHECKSUMS[field]()
    fields = {k: v for k, v in metadata.items() if k not in _CHECKSUMS}
    h.update(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode())
    for name, dtype, shape, data, *_ in sorted(pieces, key=lambda p: p[0]):
        h.update(f"\0{name}\0{dtype}\0{shape}\0".encode())
        h.update(data)
    return h.hexdigest()


def _checksum_field(metadata: Dict[str, str]) -> Optional[str]:
    return next((f for f in _CHECKSUMS if f in metadata), None)


# safetensors dtype codes as they appear in the JSON header.
_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "U8": "uint8", "I8": "int8",
              "I32": "int32", "I64": "int64", "F64": "float64"}
#: safetensors' own limit on the JSON header; a larger length prefix is damage, not an entry.
MAX_HEADER_BYTES = 100 << 20


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return name
    return "not a regular file"


def _open_regular(path: Path):
    """``path`` opened for reading, or OSError/ValueError if it is not a plain file.

    Never follows a symlink (O_NOFOLLOW, and lstat first) and never blocks: a FIFO in the store
    would hang a plain ``open``; lstat rejects it, and O_NONBLOCK covers a swap between the two."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{_file_kind(st.st_mode)}, not an entry file")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    f = os.fdopen(os.open(path, flags), "rb", buffering=0)
    st = os.fstat(f.fileno())
    if not stat.S_ISREG(st.st_mode):
        f.close()
        raise ValueError(f"{_file_kind(st.st_mode)}, not an entry file")
    return f


def _read_exactly(f, n: int, into: Optional[memoryview] = None) -> Union[bytes, memoryview]:
    buf = into if into is not None else memoryview(bytearray(n))
    got = 0
    while got < n:
        k = f.readinto(buf[got:])
        if not k:
            raise ValueError(f"file ended after {got} of {n} bytes (truncated while reading)")
        got += k
    return buf if into is not None else bytes(buf)


def _header_of(f) -> Tuple[dict, int, int]:
    """``(header JSON, header length, file size)`` of an open safetensors file, reading only the
    length prefix and the header (bounded by the file size and MAX_HEADER_BYTES)."""
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise ValueError("file shorter than the safetensors length prefix")
    (n,) = struct.unpack("<Q", _read_exactly(f, 8))
    if n > min(size - 8, MAX_HEADER_BYTES):
        raise ValueError(f"header length {n} does not fit a {size}-byte file (truncated or not safetensors)")
    header = json.loads(_read_exactly(f, n))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, n, size


def _read_header(path: Path) -> dict:
    """The raw safetensors header of ``path`` (no size check: used to recognise our own files)."""
    with _open_regular(path) as f:
        return _header_of(f)[0]


def _layout(header: dict, n: int, size: int) -> Tuple[Dict[str, str], List[Tuple[str, str, List[int], int, int]]]:
    """Metadata and ``(name, dtype, shape, begin, end)`` of each tensor (absolute offsets).

    Raises ValueError unless every field has the right type, each tensor's byte range matches its
    dtype and shape, and the tensors end exactly at ``size``: the size bound that lets a reader
    reject a truncated, padded or absurdly large file before reading its body."""
    header = dict(header)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("header metadata is not a string -> string map")
    base, end_max, specs = 8 + n, 0, []
    for name, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"] if type(d) is int and d >= 0]
            begin, end = (int(o) for o in info["data_offsets"] if type(o) is int)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r}: malformed header entry {info!r:.200}") from None
        if len(shape) != len(info["shape"]) or not 0 <= begin <= end:
            raise ValueError(f"tensor {name!r}: malformed shape or offsets")
        if end - begin != math.prod(shape) * getattr(torch, dtype).itemsize:
            raise ValueError(f"tensor {name!r}: {end - begin} bytes do not match {dtype} {shape}")
        end_max = max(end_max, end)
        specs.append((name, dtype, shape, base + begin, base + end))
    if base + end_max != size:
        raise ValueError(f"file is {size} bytes, header describes {base + end_max} (truncated or padded)")
    return metadata, specs


def _read_entry(path: Path, *, whole: bool) -> Tuple[Dict[str, str], list, Optional[bytearray]]:
    """Metadata, tensor layout and (if ``whole``) the file in a fresh writable buffer.

    The one way the store reads an entry: a plain file only (see :func:`_open_regular`), and the
    body is read only once the header has accounted for every byte of it (:func:`_layout`), so a
    20 GB sparse file or a wrong header is rejected without allocating anything."""
    with _open_regular(path) as f:
        header, n, size = _header_of(f)
        metadata, specs = _layout(header, n, size)
        if not whole:
            return metadata, specs, None
        data = bytearray(size)
        f.seek(0)
        _read_exactly(f, size, memoryview(data))
    return metadata, specs, data


_KV_DTYPES = ("float32", "float16", "bfloat16")


def _fields(m: Dict[str, str]) -> dict:
    """The typed header fields of an entry, or ValueError naming the first bad one.

    Every reader goes through this, so a header with wrong types (``num_tokens: "q0"``) or
    inconsistent ones is a damaged entry (a miss), never an exception out of ``int()``."""
    if m.get("format") != FORMAT:
        raise ValueError(f"not a kvboost-rag entry (format={m.get('format')!r})")
    if _checksum_field(m) is None:
        raise ValueError("header has no checksum")

    def field(name, conv, ok=lambda v: True):
        try:
            value = conv(m[name])
            if ok(value):
                return value
        except (KeyError, TypeError, ValueError):
            pass
        raise ValueError(f"header field {name}={m.get(name)!r:.80} is invalid")

    shape = field("shape", json.loads,
                  lambda s: isinstance(s, list) and len(s) == 4 and all(type(d) is int and d >= 0 for d in s))
    return {
        "fingerprint": field("fingerprint", str),
        "num_tokens": field("num_tokens", int, lambda n: n == shape[2]),
        "start": field("start", int),
        "kv_bits": field("kv_bits", int, lambda b: b in (16, 8, 4)),
        "dtype": field("dtype", str, lambda d: d in _KV_DTYPES),
        "shape": shape,
        "created": field("created", float),
        "meta": field("meta", json.loads, lambda v: isinstance(v, dict)),
    }


def _tensor_view(data: bytearray, dtype: str, shape: List[int], offset: int, nbytes: int) -> torch.Tensor:
    """A tensor sharing ``nbytes`` of ``data`` from ``offset`` (safetensors aligns them to 8 bytes)."""
    torch_dtype = getattr(torch, dtype)
    count = nbytes // torch_dtype.itemsize
    if count == 0:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(data, dtype=torch_dtype, count=count, offset=offset).view(shape)


class DiskStore:
    """Persistent KV store in a local directory (see module docstring for the guarantees).

    root: directory (created on demand); None -> :func:`default_store_dir`.
    max_bytes: disk budget; when exceeded after a write, least-recently-used entries (file mtime)
        are deleted. None = unbounded.
    kv_bits: 16 stores tensors as they are; 8 / 4 quantize them (:mod:`kvboost_rag.kv.quantize`) and
        ``get`` dequantizes back to the original dtype. Entries of any kv_bits are readable.
    fsync: fsync the file and its directory on every write (turn off only for throwaway stores).
    """

    def __init__(
        self,
        root: Union[str, os.PathLike, None] = None,
        *,
        max_bytes: Optional[int] = None,
        kv_bits: int = 16,
        fsync: bool = True,
    ) -> None:
        if isinstance(root, str) and "://" in root and not root.startswith("file://"):
            raise InvalidConfigError(f"DiskStore takes a local directory, got the URL {root!r}")
        if isinstance(root, str) and root.startswith("file://"):
            root = root[len("file://") :]
        self.root = Path(root).expanduser() if root is not None else default_store_dir()
        self.max_bytes = max_bytes
        self.kv_bits = check_bits(kv_bits)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._approx_bytes: Optional[int] = None
        self.hits = 0
        self.misses = 0
        self.mismatches = 0
        self.corrupt = 0
        self.evictions = 0
        self.bytes_written = 0
        self.corrupt_keys: List[str] = []
        self._check_root()
        self.remove_stale_temp_files()

    def __repr__(self) -> str:
        return f"DiskStore({str(self.root)!r}, kv_bits={self.kv_bits}, max_bytes={self.max_bytes})"

    # ------------------------------------------------------------------ paths
    def path_for(self, key: str) -> Path:
        """File of ``key``; rejects keys that could escape the directory."""
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise StoreError(f"invalid store key {key!r}: expected 2-255 characters of [0-9A-Za-z_-]")
        return self.root / key[:2].lower() / f"{key}{SUFFIX}"

    def _check_root(self) -> None:
        """Refuse a directory holding anything the store would not have written at its top level
        (a model folder, a home directory...): ``--store`` pointed at the wrong place must fail
        loudly, not have the store list, evict or repair files there. Missing/empty is fine."""
        try:
            names = sorted(e.name for e in os.scandir(self.root)
                           if not (_SHARD_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)))
        except FileNotFoundError:
            return
        except NotADirectoryError:
            raise StoreError(f"store path {self.root} is a file, not a directory") from None
        if names:
            raise StoreError(
                f"{self.root} is not a kvboost-rag store: it holds {names[0]!r}"
                + (f" and {len(names) - 1} other foreign entr{'y' if len(names) == 2 else 'ies'}" if len(names) > 1 else "")
                + ", which the store never writes (it only creates two-character shard folders). "
                "Point the store at an empty or dedicated directory.")

    def _shards(self) -> Iterator[Path]:
        """Shard folders: real directories (never symlinks) with a shard name."""
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return
        for e in entries:
            if _SHARD_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False):
                yield Path(e.path)

    def _iter_paths(self) -> Iterator[Path]:
        """Every path named like an entry in its own shard (whatever its type: readers check)."""
        for shard in self._shards():
            try:
                names = sorted(os.listdir(shard))
            except OSError:
                continue
            for name in names:
                if _is_entry_name(name, shard.name):
                    yield shard / name

    def _wrote(self, path: Path, *, unreadable_ok: bool = False) -> bool:
        """Whether the store wrote ``path``: the only files it ever deletes.

        It must sit where the store puts entries (:func:`_is_entry_name`), be a regular file (never
        a symlink, so nothing outside the root is reachable) and carry the store's ``format`` marker
        in its header. A file whose header cannot be read at all counts only with
        ``unreadable_ok`` (``verify(remove=True)``, i.e. ``inspect --repair``)."""
        if path.parent.parent != self.root or not _is_entry_name(path.name, path.parent.name):
            return False
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return False
            metadata = _read_header(path).get("__metadata__")
        except FileNotFoundError:
            return False
        except (OSError, ValueError, RecursionError):
            return unreadable_ok
        return isinstance(metadata, dict) and metadata.get("format") == FORMAT

    def _remove(self, path: Path, *, unreadable_ok: bool = False, expect: Optional[os.stat_result] = None) -> bool:
        """Delete ``path`` if the store wrote it and (given ``expect``) it is still the file that
        was read: a concurrent writer may have replaced it with a good copy. True if deleted."""
        if not self._wrote(path, unreadable_ok=unreadable_ok):
            return False
        try:
            if expect is not None:
                now = os.lstat(path)
                if (now.st_ino, now.st_mtime_ns, now.st_size) != (expect.st_ino, expect.st_mtime_ns, expect.st_size):
                    return False
            path.unlink()
            return True
        except FileNotFoundError:
            return False

    def keys(self) -> Iterator[str]:
        """Keys of every entry file present (intact or not)."""
        for p in self._iter_paths():
            yield p.name[: -len(SUFFIX)]

    def __len__(self) -> int:
        return sum(1 for _ in self._iter_paths())

    @property
    def nbytes(self) -> int:
        """Bytes used by entry files right now (a directory scan)."""
        total = 0
        for p in self._iter_paths():
            try:
                total += os.lstat(p).st_size
            except FileNotFoundError:
                pass
        return total

    # --------------------------------------------------------------- encoding
    def _serialize(self, chunk: KVChunk) -> bytes:
        keys = chunk.keys.detach().to("cpu").contiguous()
        values = chunk.values.detach().to("cpu").contiguous()
        if self.kv_bits == 16:
            tensors = {"keys": keys, "values": values}
        else:
            tensors = quantize_kv(keys, values, self.kv_bits)
        tensors["token_ids"] = torch.tensor(list(chunk.token_ids), dtype=torch.int32)
        now = f"{time.time():.3f}"
        metadata = {
            "format": FORMAT,
            "fingerprint": str(chunk.fingerprint),
            "encoding_version": str(chunk.meta.get("encoding_version", chunk.meta.get("version", ""))),
            "num_tokens": str(chunk.num_tokens),
            "start": str(int(chunk.start)),
            "dtype": _dtype_name(keys.dtype),
            "shape": json.dumps(list(keys.shape)),
            "kv_bits": str(self.kv_bits),
            "created": now,
            "last_used": now,
            "has_text": "1" if chunk.text is not None else "0",
            "text": chunk.text or "",
            "meta": json.dumps(chunk.meta, sort_keys=True, default=str),
        }
        pieces = [(n, _dtype_name(t.dtype), list(t.shape), _tensor_bytes(t)) for n, t in tensors.items()]
        metadata[_WRITE_CHECKSUM] = _checksum(metadata, pieces, _WRITE_CHECKSUM)
        return st_save(tensors, metadata=metadata)

    @staticmethod
    def _deserialize(metadata: Dict[str, str], specs: list, data: bytearray) -> Tuple[Dict[str, str], Dict[str, torch.Tensor]]:
        """Verify an entry read by :func:`_read_entry`; raises ValueError naming what is wrong. The
        tensors are views of ``data`` (which they keep alive), so a verified entry is never copied twice."""
        _fields(metadata)
        field = _checksum_field(metadata)
        view = memoryview(data)
        pieces = [(name, dtype, shape, view[begin:end]) for name, dtype, shape, begin, end in specs]
        if _checksum(metadata, pieces, field) != metadata[field]:
            raise ValueError("checksum mismatch (bytes changed after writing)")
        return metadata, {name: _tensor_view(data, dtype, shape, begin, end - begin)
                          for name, dtype, shape, begin, end in specs}

    @staticmethod
    def _to_chunk(metadata: Dict[str, str], tensors: Dict[str, torch.Tensor]) -> KVChunk:
        f = _fields(metadata)
        dtype = getattr(torch, f["dtype"])
        if f["kv_bits"] == 16:
            keys, values = tensors["keys"], tensors["values"]
        else:
            keys, values = dequantize_kv(tensors, f["kv_bits"], tuple(f["shape"]), dtype)
        if list(keys.shape) != f["shape"] or keys.dtype != dtype:
            raise ValueError(f"tensors are {keys.dtype} {list(keys.shape)}, header says {f['dtype']} {f['shape']}")
        return KVChunk(
            keys=keys,
            values=values,
            start=f["start"],
            token_ids=tuple(tensors["token_ids"].reshape(-1).tolist()),
            fingerprint=f["fingerprint"],
            text=metadata.get("text", "") if metadata.get("has_text") == "1" else None,
            meta=f["meta"],
        )

    def as_stored(self, chunk: KVChunk) -> KVChunk:
        """The chunk a later ``get`` will return for ``chunk`` (quantization round trip applied),
        so a memory tier above can hold exactly what the disk holds."""
        if self.kv_bits == 16:
            return chunk
        keys, values = roundtrip_kv(chunk.keys.detach(), chunk.values.detach(), self.kv_bits)
        return KVChunk(keys, values, chunk.start, tuple(chunk.token_ids), chunk.fingerprint, chunk.text, dict(chunk.meta))

    # ------------------------------------------------------------- corruption
    def _mark_corrupt(self, key: str, path: Path, reason: str, st: Optional[os.stat_result],
                      *, unreadable_ok: bool = False) -> bool:
        """Count and log a damaged entry; remove it so it is recomputed, never served, if the
        store wrote it (:meth:`_remove`). Returns whether it was removed."""
        with self._lock:
            self.corrupt += 1
            if key not in self.corrupt_keys:
                self.corrupt_keys.append(key)
        log.warning("kvboost-rag store: corrupt entry %s (%s): %s; it will be recomputed", key, path, reason)
        try:
            return self._remove(path, unreadable_ok=unreadable_ok, expect=st)
        except OSError as exc:  # read-only store: still never served
            log.warning("kvboost-rag store: could not remove corrupt entry %s: %s", path, exc)
            return False

    # -------------------------------------------------------------- interface
    def get(self, key: str, fingerprint: str) -> Optional[KVChunk]:
        """The verified chunk for ``key`` made by ``fingerprint``, else None (miss)."""
        path = self.path_for(key)
        try:
            st = os.lstat(path)
            metadata, tensors = self._deserialize(*_read_entry(path, whole=True))
            if metadata["fingerprint"] != fingerprint:
                with self._lock:
                    self.mismatches += 1
                    self.misses += 1
                return None
            chunk = self._to_chunk(metadata, tensors)
        except FileNotFoundError:
            with self._lock:
                self.misses += 1
            return None
        except MemoryError:
            raise  # an intact entry too large for this machine is not damage
        except Exception as exc:  # any read/parse/verify failure means the entry is unusable
            self._mark_corrupt(key, path, f"{type(exc).__name__}: {exc}", st)
            with self._lock:
                self.misses += 1
            return None
        try:
            os.utime(path)  # last-used for LRU, without rewriting the file
        except OSError:
            pass
        with self._lock:
            self.hits += 1
        return chunk

    def contains(self, key: str, fingerprint: str) -> bool:
        """Whether an entry by ``fingerprint`` exists and its header and length are intact.

        Reads only the header (no tensor bytes), so resuming a large warm job stays cheap; a
        bit flip inside tensor data is caught by ``get``/``verify`` instead."""
        path = self.path_for(key)
        try:
            st = os.lstat(path)
            fields = _fields(_read_entry(path, whole=False)[0])
        except FileNotFoundError:
            return False
        except Exception as exc:
            self._mark_corrupt(key, path, f"unreadable header: {type(exc).__name__}: {exc}", st)
            return False
        return fields["fingerprint"] == fingerprint

    def put(self, key: str, chunk: KVChunk) -> int:
        """Write ``chunk`` atomically under ``key`` (replacing any previous entry); returns bytes written."""
        path = self.path_for(key)
        data = self._serialize(chunk)
        self._atomic_write(path, data)
        with self._lock:
            self.bytes_written += len(data)
            if key in self.corrupt_keys:
                self.corrupt_keys.remove(key)
            if self._approx_bytes is not None:
                self._approx_bytes += len(data)
        if self.max_bytes is not None:
            self._maybe_evict(keep=path)
        return len(data)

    def _atomic_write(self, path: Path, data: bytes) -> None:
        directory = path.parent
        new_dir = not directory.is_dir()
        directory.mkdir(parents=True, exist_ok=True)
        # host and pid in the name: the next open removes it once this writer is gone (see _TEMP_RE)
        tmp = directory / f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        if self.fsync:
            fsync_dir(directory)
            if new_dir:
                fsync_dir(directory.parent)

    def texts(self, fingerprint: str) -> Iterator[Tuple[str, str]]:
        """``(key, text)`` of entries by ``fingerprint`` that recorded their text (headers only)."""
        for path in self._iter_paths():
            try:
                metadata = _read_entry(path, whole=False)[0]
                _fields(metadata)
            except Exception:
                continue  # damaged entries are reported by get/verify, not here
            if metadata["fingerprint"] == fingerprint and metadata.get("has_text") == "1":
                yield path.name[: -len(SUFFIX)], metadata.get("text", "")

    def delete(self, key: str) -> bool:
        """Remove the entry of ``key`` if the store wrote it; True if a file was removed."""
        return self._remove(self.path_for(key))

    def clear(self) -> None:
        """Remove every entry the store wrote (anything else in its folders is left alone)."""
        for path in list(self._iter_paths()):
            self._remove(path)
        with self._lock:
            self._approx_bytes = None

    # ------------------------------------------------------------ inspection
    def entries(self) -> Iterator[EntryInfo]:
        """Header summary of each readable entry (unreadable ones are skipped; see :meth:`verify`)."""
        for path in self._iter_paths():
            try:
                st = os.lstat(path)
                m = _read_entry(path, whole=False)[0]
                f = _fields(m)
            except Exception:
                continue
            yield EntryInfo(
                key=path.name[: -len(SUFFIX)],
                path=path,
                fingerprint=f["fingerprint"],
                num_tokens=f["num_tokens"],
                kv_bits=f["kv_bits"],
                dtype=f["dtype"],
                nbytes=st.st_size,
                created=f["created"],
                last_used=st.st_mtime,
                encoding_version=m.get("encoding_version", ""),
                has_text=m.get("has_text") == "1",
            )

    def verify(self, *, remove: bool = False) -> List[Tuple[str, str]]:
        """Fully check every entry (parse + checksum + tensor shapes). Returns ``(key, reason)``
        for each bad one (a directory, FIFO or symlink in an entry's place included); with
        ``remove=True`` also deletes those the store wrote, so they get recomputed."""
        bad = []
        for path in list(self._iter_paths()):
            key = path.name[: -len(SUFFIX)]
            try:
                st = os.lstat(path)
                self._to_chunk(*self._deserialize(*_read_entry(path, whole=True)))
            except FileNotFoundError:
                continue
            except MemoryError:
                raise
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                if remove and not self._mark_corrupt(key, path, reason, st, unreadable_ok=True):
                    reason += " (left in place: not a file this store wrote)"
                bad.append((key, reason))
        return bad

    def stale_temp_files(self, older_than_s: float = STALE_TEMP_AGE_S) -> List[Path]:
        """Temp files of atomic writes whose writer is gone: on this host with a dead pid, or
        untouched for ``older_than_s``. Another live writer's temp file is never listed."""
        out, now = [], time.time()
        for shard in self._shards():
            try:
                names = [n for n in os.listdir(shard) if n.endswith(".tmp")]
            except OSError:
                continue
            for name in names:
                m = _TEMP_RE.fullmatch(name)
                try:
                    st = os.lstat(shard / name)
                except OSError:
                    continue
                if m is None or not stat.S_ISREG(st.st_mode):
                    continue
                if now - st.st_mtime > older_than_s or (m["host"] == _HOST and not _pid_alive(int(m["pid"]))):
                    out.append(shard / name)
        return out

    def remove_stale_temp_files(self) -> int:
        """Delete :meth:`stale_temp_files` (done on open); returns how many were removed."""
        removed = 0
        for tmp in self.stale_temp_files():
            try:
                tmp.unlink()
                removed += 1
            except OSError:
                pass  # gone already, or a read-only store: harmless either way
        return removed

    def stats(self) -> Dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "mismatches": self.mismatches,
            "corrupt": self.corrupt,
            "evictions": self.evictions,
            "bytes_written": self.bytes_written,
        }

    # --------------------------------------------------------------- eviction
    def _maybe_evict(self, keep: Path) -> None:
        with self._lock:
            approx = self._approx_bytes
        if approx is not None and approx <= self.max_bytes:
            return
        files = []
        for p in self._iter_paths():
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                files.append((st.st_mtime, st.st_size, p, st))
        total = sum(f[1] for f in files)
        files.sort(key=lambda f: f[0])
        for _, size, p, st in files:
            if total <= self.max_bytes:
                break
            if p != keep and self._remove(p, expect=st):  # only files the store wrote
                total -= size
                with self._lock:
                    self.evictions += 1
        with self._lock:
            self._approx_bytes = total


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
    kv_bits: int = 16,
    max_bytes: Optional[int] = None,
    memory_bytes: Optional[int] = 1 << 30,
) -> TieredStore:
    """A :class:`TieredStore` over ``path`` (default directory if None): the usual way to get a
    persistent store for an engine, e.g. ``KVBoostEngine.from_pretrained(store=open_store())``."""
    return TieredStore(MemoryStore(memory_bytes), DiskStore(path, max_bytes=max_bytes, kv_bits=kv_bits))
