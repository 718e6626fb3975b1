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

``contains`` reads only the header (safetensors also checks that the file length matches it, which
catches truncation); full checksum verification happens on ``get`` and in :meth:`DiskStore.verify`.

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
import os
import re
import secrets
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save as st_save

from .chunk import KVChunk
from .errors import InvalidConfigError, StoreError
from .quantize import check_bits, dequantize_kv, quantize_kv, roundtrip_kv
from .store import MemoryStore

log = logging.getLogger(__name__)

FORMAT = "kvboost-rag-kv/1"
SUFFIX = ".safetensors"
_KEY_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z_\-]{1,254}")


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


def _parse_file(data: Union[bytes, bytearray]) -> Tuple[Dict[str, str], List[Tuple[str, str, List[int], memoryview, int]]]:
    """Header metadata and ``(name, dtype, shape, bytes, offset)`` of each tensor of a safetensors
    blob (raises on damage)."""
    if len(data) < 8:
        raise ValueError("file shorter than the safetensors length prefix")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("header runs past the end of the file (truncated)")
    header = json.loads(data[8 : 8 + n])
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    view = memoryview(data)
    pieces = []
    end_max = 0
    for name, info in header.items():
        start, end = info["data_offsets"]
        end_max = max(end_max, end)
        pieces.append((name, _ST_DTYPES.get(info["dtype"], info["dtype"]), list(info["shape"]), view[base + start : base + end], base + start))
    if base + end_max != len(data):
        raise ValueError(f"file is {len(data)} bytes, header describes {base + end_max} (truncated or padded)")
    return metadata, pieces


def _read_file(path: Path) -> bytearray:
    """The whole file in a fresh writable buffer (one copy out of the page cache)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = bytearray(size)
        got = f.readinto(buf)
    return buf if got == size else buf[:got]  # shrank while reading: the parse then rejects it


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
    kv_bits: 16 stores tensors as they are; 8 / 4 quantize them (:mod:`kvboost_rag.quantize`) and
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

    def __repr__(self) -> str:
        return f"DiskStore({str(self.root)!r}, kv_bits={self.kv_bits}, max_bytes={self.max_bytes})"

    # ------------------------------------------------------------------ paths
    def path_for(self, key: str) -> Path:
        """File of ``key``; rejects keys that could escape the directory."""
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise StoreError(f"invalid store key {key!r}: expected 2-255 characters of [0-9A-Za-z_-]")
        return self.root / key[:2].lower() / f"{key}{SUFFIX}"

    def _iter_paths(self) -> Iterator[Path]:
        if not self.root.is_dir():
            return
        for shard in sorted(self.root.iterdir()):
            if not shard.is_dir() or shard.name.startswith("."):
                continue
            for p in sorted(shard.iterdir()):
                if p.name.endswith(SUFFIX) and not p.name.startswith("."):
                    yield p

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
                total += p.stat().st_size
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
    def _deserialize(data: bytearray) -> Tuple[Dict[str, str], Dict[str, torch.Tensor]]:
        """Parse and verify a blob; raises ValueError naming what is wrong. The tensors are views
        of ``data`` (which they keep alive), so a verified entry is never copied twice."""
        metadata, pieces = _parse_file(data)
        if metadata.get("format") != FORMAT:
            raise ValueError(f"not a kvboost-rag entry (format={metadata.get('format')!r})")
        field = _checksum_field(metadata)
        if field is None:
            raise ValueError("header has no checksum")
        if _checksum(metadata, pieces, field) != metadata[field]:
            raise ValueError("checksum mismatch (bytes changed after writing)")
        return metadata, {name: _tensor_view(data, dtype, shape, offset, piece.nbytes)
                          for name, dtype, shape, piece, offset in pieces}

    @staticmethod
    def _to_chunk(metadata: Dict[str, str], tensors: Dict[str, torch.Tensor]) -> KVChunk:
        bits = int(metadata["kv_bits"])
        dtype = getattr(torch, metadata["dtype"])
        if bits == 16:
            keys, values = tensors["keys"], tensors["values"]
        else:
            keys, values = dequantize_kv(tensors, bits, tuple(json.loads(metadata["shape"])), dtype)
        return KVChunk(
            keys=keys,
            values=values,
            start=int(metadata["start"]),
            token_ids=tuple(tensors["token_ids"].tolist()),
            fingerprint=metadata["fingerprint"],
            text=metadata["text"] if metadata.get("has_text") == "1" else None,
            meta=json.loads(metadata.get("meta") or "{}"),
        )

    def as_stored(self, chunk: KVChunk) -> KVChunk:
        """The chunk a later ``get`` will return for ``chunk`` (quantization round trip applied),
        so a memory tier above can hold exactly what the disk holds."""
        if self.kv_bits == 16:
            return chunk
        keys, values = roundtrip_kv(chunk.keys.detach(), chunk.values.detach(), self.kv_bits)
        return KVChunk(keys, values, chunk.start, tuple(chunk.token_ids), chunk.fingerprint, chunk.text, dict(chunk.meta))

    # ------------------------------------------------------------- corruption
    def _mark_corrupt(self, key: str, path: Path, reason: str, st: Optional[os.stat_result]) -> None:
        """Count, log and remove a damaged entry so it is recomputed, never served.

        Removed only if the file is still the one we read: a concurrent writer may already have
        replaced it with a good copy."""
        with self._lock:
            self.corrupt += 1
            if key not in self.corrupt_keys:
                self.corrupt_keys.append(key)
        log.warning("kvboost-rag store: corrupt entry %s (%s): %s; it will be recomputed", key, path, reason)
        try:
            now = path.stat()
            if st is None or (now.st_ino == st.st_ino and now.st_mtime_ns == st.st_mtime_ns and now.st_size == st.st_size):
                path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # read-only store: still never served
            log.warning("kvboost-rag store: could not remove corrupt entry %s: %s", path, exc)

    def _read_header(self, path: Path) -> Dict[str, str]:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}

    # -------------------------------------------------------------- interface
    def get(self, key: str, fingerprint: str) -> Optional[KVChunk]:
        """The verified chunk for ``key`` made by ``fingerprint``, else None (miss)."""
        path = self.path_for(key)
        try:
            st = path.stat()
            data = _read_file(path)
        except FileNotFoundError:
            with self._lock:
                self.misses += 1
            return None
        try:
            metadata, tensors = self._deserialize(data)
            if metadata.get("fingerprint") != fingerprint:
                with self._lock:
                    self.mismatches += 1
                    self.misses += 1
                return None
            chunk = self._to_chunk(metadata, tensors)
        except Exception as exc:  # any parse/verify failure means the entry is unusable
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
            st = path.stat()
        except FileNotFoundError:
            return False
        try:
            metadata = self._read_header(path)
        except FileNotFoundError:
            return False
        except Exception as exc:
            self._mark_corrupt(key, path, f"unreadable header: {exc}", st)
            return False
        if metadata.get("format") != FORMAT or _checksum_field(metadata) is None:
            self._mark_corrupt(key, path, "header is not a kvboost-rag entry", st)
            return False
        return metadata.get("fingerprint") == fingerprint

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
        tmp = directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
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
                metadata = self._read_header(path)
            except Exception:
                continue  # damaged entries are reported by get/verify, not here
            if metadata.get("fingerprint") == fingerprint and metadata.get("has_text") == "1":
                yield path.name[: -len(SUFFIX)], metadata.get("text", "")

    def delete(self, key: str) -> bool:
        try:
            self.path_for(key).unlink()
            return True
        except FileNotFoundError:
            return False

    def clear(self) -> None:
        for path in list(self._iter_paths()):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        with self._lock:
            self._approx_bytes = None

    # ------------------------------------------------------------ inspection
    def entries(self) -> Iterator[EntryInfo]:
        """Header summary of each readable entry (unreadable ones are skipped; see :meth:`verify`)."""
        for path in self._iter_paths():
            try:
                st = path.stat()
                m = self._read_header(path)
            except Exception:
                continue
            yield EntryInfo(
                key=path.name[: -len(SUFFIX)],
                path=path,
                fingerprint=m.get("fingerprint", ""),
                num_tokens=int(m.get("num_tokens", 0) or 0),
                kv_bits=int(m.get("kv_bits", 16) or 16),
                dtype=m.get("dtype", ""),
                nbytes=st.st_size,
                created=float(m.get("created", 0) or 0),
                last_used=st.st_mtime,
                encoding_version=m.get("encoding_version", ""),
                has_text=m.get("has_text") == "1",
            )

    def verify(self, *, remove: bool = False) -> List[Tuple[str, str]]:
        """Fully check every entry (parse + checksum + tensor shapes). Returns ``(key, reason)``
        for each bad one; with ``remove=True`` also deletes them so they get recomputed."""
        bad = []
        for path in list(self._iter_paths()):
            key = path.name[: -len(SUFFIX)]
            try:
                st = path.stat()
                data = _read_file(path)
            except FileNotFoundError:
                continue
            try:
                metadata, tensors = self._deserialize(data)
                self._to_chunk(metadata, tensors)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                bad.append((key, reason))
                if remove:
                    self._mark_corrupt(key, path, reason, st)
        return bad

    def stale_temp_files(self, older_than_s: float = 3600.0) -> List[Path]:
        """Temp files left by killed writers (harmless; never read as entries)."""
        out = []
        if not self.root.is_dir():
            return out
        cutoff = time.time() - older_than_s
        for p in self.root.glob("*/.*.tmp"):
            try:
                if p.stat().st_mtime < cutoff:
                    out.append(p)
            except FileNotFoundError:
                pass
        return out

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
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        files.sort(key=lambda f: f[0])
        for _, size, p in files:
            if total <= self.max_bytes:
                break
            if p == keep:
                continue
            try:
                p.unlink()
                total -= size
                with self._lock:
                    self.evictions += 1
            except FileNotFoundError:
                total -= size
        with self._lock:
            self._approx_bytes = total


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename in it survives power loss (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
