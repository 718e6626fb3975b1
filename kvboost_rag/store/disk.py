"""Persistent KV tier: :class:`DiskStore`, one safetensors file per chunk in a local directory.

Layout: ``<root>/<key[:2]>/<key>.safetensors`` (sharded by the key's first two characters so that
no single directory holds every entry); default root :func:`default_store_dir`. Design:
docs/store.md. Why it is safe to crash, to run two writers, and to read while writing:

* **Atomic writes** (:func:`kvboost_rag.files.atomic_file`): an entry is written to a temp file in
  its own directory, fsynced, renamed over the final name, and the directory fsynced. A reader
  sees no file, the old file or the complete new one; of two writers of one key the last rename
  wins, and both files are valid.
* **Verified reads** (:mod:`~kvboost_rag.store.entry_format`: checksum, typed header, model
  fingerprint): a damaged entry is a miss, counted in ``corrupt``, logged, listed in
  ``corrupt_keys`` and removed so that it is recomputed, never served; an entry made by another
  model is never returned (``get`` -> None, ``contains`` -> False).
* **Never touches what it did not write** (:mod:`~kvboost_rag.store.safe_files`): a root holding
  anything but shard folders is refused with a :class:`~kvboost_rag.errors.StoreError`;
  eviction, ``clear``, corruption removal and ``inspect --repair`` delete only
  :meth:`DiskStore._wrote` files; temp files of killed writers are removed on the next open, a
  live writer's never.

``contains`` reads only the header (and checks the file length against it, which catches
truncation); ``get`` and :meth:`DiskStore.verify` check the checksum. An entry's last-used time
is its file's mtime, refreshed with ``os.utime`` on every hit, so LRU eviction never rewrites one.
Verification, stale temp files and eviction are :mod:`~kvboost_rag.store.disk_upkeep`. ``TieredStore``
and ``open_store`` (:mod:`kvboost_rag.store.tiered`) are importable from here too.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path
from typing import Container, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from kvboost_rag import validate
from kvboost_rag.errors import InvalidConfigError, InvalidInputError, StoreError
from kvboost_rag.files import atomic_file, fsync_dir
from kvboost_rag.kv.chunk import KVChunk
from kvboost_rag.store.accounting import count_write
from kvboost_rag.store.disk_upkeep import DiskUpkeep
from kvboost_rag.store.entry_format import (FORMAT, MAX_HEADER_BYTES, SUFFIX, EntryInfo, _as_stored,
                                            _deserialize, _entry_info, _fields, _serialize, _to_chunk)
from kvboost_rag.store.settings import read_settings, resolve_kv_bits, write_settings
from kvboost_rag.store.safe_files import (_KEY_RE, STALE_TEMP_AGE_S, _check_root, _entry_paths, _entry_paths_in,
                                          _read_entry, _squatter, _store_wrote, _temp_path)

__all__ = ["DiskStore", "TieredStore", "open_store", "EntryInfo", "FORMAT", "SUFFIX", "MAX_HEADER_BYTES",
           "STALE_TEMP_AGE_S", "default_store_dir", "fsync_dir"]

log = logging.getLogger(__name__)


def __getattr__(name: str):
    """``TieredStore`` and ``open_store`` live in :mod:`kvboost_rag.store.tiered`, which imports
    this module; they are resolved on first use so that both import paths keep working."""
    if name in ("TieredStore", "open_store"):
        from kvboost_rag.store import tiered

        return getattr(tiered, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_store_dir() -> Path:
    """``$KVBOOST_RAG_HOME/store`` if set, else ``~/.cache/kvboost_rag/store``."""
    home = os.environ.get("KVBOOST_RAG_HOME")
    base = Path(home).expanduser() if home else Path("~/.cache/kvboost_rag").expanduser()
    return base / "store"


class DiskStore(DiskUpkeep):
    """Persistent KV store in a local directory (see module docstring for the guarantees; its
    upkeep methods ``verify``, ``stale_temp_files``, ``remove_stale_temp_files`` are
    :class:`~kvboost_rag.store.disk_upkeep.DiskUpkeep`'s).

    root: directory (created on demand); None -> :func:`default_store_dir`.
    max_bytes: disk budget; when exceeded after a write, least-recently-used entries (file mtime)
        are deleted. None = unbounded.
    kv_bits: 16 stores tensors as they are; 8 / 4 quantize them (:mod:`kvboost_rag.kv.quantize`) and
        ``get`` dequantizes back to the original dtype. Entries of any kv_bits are readable. None
        (default): the setting the store records (:mod:`kvboost_rag.store.settings`), 16 for a
        store written before settings were recorded, else
        :data:`~kvboost_rag.config.DEFAULT_KV_BITS` (8) for a new store; the first entry written
        records it.
    fsync: fsync the file and its directory on every write (turn off only for throwaway stores).
    """

    def __init__(
        self,
        root: Union[str, os.PathLike, None] = None,
        *,
        max_bytes: Optional[int] = None,
        kv_bits: Optional[int] = None,
        fsync: bool = True,
    ) -> None:
        if root is not None and not isinstance(root, (str, os.PathLike)):
            raise InvalidInputError(f"DiskStore takes a directory path (str or os.PathLike) or None for the default "
                                    f"({default_store_dir()}); got {type(root).__name__} {validate.show(root)}")
        if isinstance(root, str) and not root.strip():
            raise InvalidConfigError("the store path is empty; give a directory (e.g. ~/kv), or leave it out for "
                                     f"the default ({default_store_dir()})")
        if isinstance(root, str) and "://" in root and not root.startswith("file://"):
            raise InvalidConfigError(f"DiskStore takes a local directory, got the URL {root!r}")
        if isinstance(root, str) and root.startswith("file://"):
            root = root[len("file://") :]
        self.root = Path(root).expanduser() if root is not None else default_store_dir()
        self.max_bytes = validate.byte_budget("the disk budget (DiskStore / open_store max_bytes, --max-bytes)",
                                              max_bytes)
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
        _check_root(self.root)
        recorded = read_settings(self.root).get("kv_bits")
        self._settings_recorded = recorded is not None
        self.kv_bits = resolve_kv_bits(kv_bits, recorded, has_entries=recorded is None and self._has_entries())
        self.remove_stale_temp_files()

    def _has_entries(self) -> bool:
        return next(iter(self._iter_paths()), None) is not None

    def _record_settings(self) -> None:
        """With the store's first entry: record the setting it writes with (``store.json``)."""
        if self._settings_recorded:
            return
        if not read_settings(self.root):  # another process may have recorded one meanwhile
            write_settings(self.root, {"kv_bits": self.kv_bits}, fsync=self.fsync)
        self._settings_recorded = True

    def __repr__(self) -> str:
        return f"DiskStore({str(self.root)!r}, kv_bits={self.kv_bits}, max_bytes={self.max_bytes})"

    # ------------------------------------------------------------------ paths
    def path_for(self, key: str) -> Path:
        """File of ``key``; rejects keys that could escape the directory."""
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise StoreError(f"invalid store key {key!r}: expected 2-255 characters of [0-9A-Za-z_-]")
        return self.root / key[:2].lower() / f"{key}{SUFFIX}"

    def _iter_paths(self) -> Iterator[Path]:
        """Every path named like an entry in its own shard (whatever its type: readers check)."""
        return _entry_paths(self.root)

    def _wrote(self, path: Path, *, unreadable_ok: bool = False) -> bool:
        """Whether the store wrote ``path``, the only files it ever deletes
        (:func:`~kvboost_rag.store.safe_files._store_wrote`)."""
        return _store_wrote(self.root, path, unreadable_ok=unreadable_ok)

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

    def as_stored(self, chunk: KVChunk) -> KVChunk:
        """The chunk a later ``get`` will return for ``chunk`` (quantization round trip applied),
        so a memory tier above can hold exactly what the disk holds."""
        return _as_stored(chunk, self.kv_bits)

    # ------------------------------------------------------------- corruption
    def _mark_corrupt(self, key: str, path: Path, reason: str, st: Optional[os.stat_result],
                      *, unreadable_ok: bool = False) -> bool:
        """Count and log a damaged entry; remove it so it is recomputed, never served, if the
        store wrote it (:meth:`_remove`). Returns whether it was removed."""
        with self._lock:
            self.corrupt += 1
            if key not in self.corrupt_keys:
                self.corrupt_keys.append(key)
        squatter = _squatter(path)
        if squatter is not None:  # nothing to recompute into until someone removes it
            log.warning("kvboost-rag store: entry %s is a miss: %s", key, squatter)
            return False
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
            metadata, tensors = _deserialize(*_read_entry(path, whole=True))
            if metadata["fingerprint"] != fingerprint:
                with self._lock:
                    self.mismatches += 1
                    self.misses += 1
                return None
            chunk = _to_chunk(metadata, tensors)
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
        """Write ``chunk`` atomically under ``key`` (replacing any previous entry); returns bytes written.

        A :class:`~kvboost_rag.errors.StoreError` if the entry's place holds something the store
        never writes (a directory, FIFO, symlink: it is not replaced) or the store is read-only for
        this process (readers still get every entry); OSError if the write fails otherwise (disk
        full: ``ENOSPC`` / ``EFBIG``)."""
        path = self.path_for(key)
        squatter = _squatter(path)
        if squatter is not None:
            raise StoreError(f"cannot store {key}: {squatter}")
        data = _serialize(chunk, self.kv_bits)
        try:
            self._atomic_write(path, data)
            self._record_settings()
        except OSError as exc:
            if isinstance(exc, PermissionError) or exc.errno == errno.EROFS:
                raise StoreError(f"cannot store {key}: the store {self.root} is read-only for this process "
                                 f"({exc.strerror}); readers can still use its entries") from exc
            raise
        count_write(self, key, len(data))
        if self.max_bytes is not None:
            self._maybe_evict(keep=path)
        return len(data)

    def _atomic_write(self, path: Path, data: bytes) -> None:
        """Replace ``path`` by ``data`` through a temp file the store recognises as its own
        (:func:`~kvboost_rag.store.safe_files._temp_path`); with ``fsync``, a shard folder this
        write created is made durable in the root as well."""
        directory = path.parent
        new_dir = not directory.is_dir()
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, temp=_temp_path(path), fsync=self.fsync, sync_dir=True) as f:
            f.write(data)
        if self.fsync and new_dir:
            fsync_dir(directory.parent)

    def texts(self, fingerprint: str, *, shards: Optional[Iterable[str]] = None,
              skip: Container[str] = ()) -> Iterator[Tuple[str, str]]:
        """``(key, text)`` of entries by ``fingerprint`` that recorded their text (headers only).

        ``shards``: only these shard folders (names); ``skip``: keys whose header is not read
        (already known to the caller), so a re-scan by :class:`~kvboost_rag.store.watch.StoreWatch`
        reads only the headers of new entries in the folders that changed."""
        if shards is None:
            paths = self._iter_paths()
        else:
            paths = (p for name in sorted(set(shards)) for p in _entry_paths_in(self.root, name))
        for path in paths:
            if path.name[: -len(SUFFIX)] in skip:
                continue
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
                info = _entry_info(path, os.lstat(path), _read_entry(path, whole=False)[0])
            except Exception:
                continue
            yield info

    def stats(self) -> Dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "mismatches": self.mismatches,
            "corrupt": self.corrupt,
            "evictions": self.evictions,
            "bytes_written": self.bytes_written,
        }
