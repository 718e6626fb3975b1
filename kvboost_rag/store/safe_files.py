"""File-system safety of the disk store: which paths it recognises as its own, and how it reads them.

* **Names**: an entry lives at ``<root>/<key[:2].lower()>/<key>.safetensors``
  (:func:`_is_entry_name`); the root holds nothing but those two-character shard folders, so a
  directory holding anything else is refused (:func:`_check_root`) rather than listed, evicted
  from or repaired.
* **One bad file is a miss**: an entry path that is a directory, FIFO, symlink, unreadable,
  padded far beyond its header or whose header fields have wrong types can never hang, crash or
  exhaust a reader. Files are opened without following symlinks and without blocking
  (:func:`_open_regular`), and :func:`_read_entry` reads the body only once the header has
  accounted for every byte of the file.
* **Temp files** of atomic writes are named ``.<key>.safetensors.<host>.<pid>.<random>.tmp``
  (:func:`_temp_path`), so the next open can tell an abandoned one (its writer's pid is gone from
  this host, or it is untouched for :data:`STALE_TEMP_AGE_S`) from a live writer's, which is never
  touched (:func:`_stale_temp_files`).

The entry format itself is :mod:`kvboost_rag.store.entry_format`.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import socket
import stat
import struct
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

from kvboost_rag.errors import StoreError
from kvboost_rag.store.entry_format import FORMAT, MAX_HEADER_BYTES, SUFFIX, _layout

_KEY_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z_\-]{1,254}")
#: Shard folder names: ``key[:2].lower()``. The only thing the store ever puts in its root.
_SHARD_RE = re.compile(r"[0-9a-z][0-9a-z_\-]")
#: Temp file of an atomic write: ``.<key>.safetensors.<host>.<pid>.<random>.tmp`` (a name without
#: the host is still recognised; it is cleaned by age only).
_TEMP_RE = re.compile(r"\.[0-9A-Za-z][0-9A-Za-z_\-]{1,254}\.safetensors\.(?:(?P<host>[0-9A-Za-z-]{1,63})\.)?"
                      r"(?P<pid>[0-9]{1,10})\.[0-9a-f]{8}\.tmp")
_HOST = re.sub(r"[^0-9A-Za-z-]", "-", socket.gethostname())[:63] or "host"
#: A temp file untouched this long is abandoned whoever wrote it (a live write keeps touching
#: its file and renames it within seconds); younger ones are removed only if their writer is dead.
STALE_TEMP_AGE_S = 3600.0


# ------------------------------------------------------------------------------------ names
def _is_entry_name(name: str, shard: str) -> bool:
    """Whether ``shard/name`` is exactly where the store would put an entry: ``<key>.safetensors``
    in the folder ``key[:2].lower()``."""
    key = name[: -len(SUFFIX)]
    return name.endswith(SUFFIX) and _KEY_RE.fullmatch(key) is not None and key[:2].lower() == shard


# Files a store keeps beside its shards (never entries, never listed, evicted or repaired): its
# settings (:mod:`kvboost_rag.store.settings`), the co-retrieval table
# (:mod:`kvboost_rag.index.coretrieval`) and their temp files.
_SIDECAR_RE = re.compile(r"(?:store|coretrieval)\.json(?:\.[0-9A-Za-z_]+\.tmp)?")


def _check_root(root: Path) -> None:
    """Refuse a directory holding anything the store would not have written at its top level
    (a model folder, a home directory...): ``--store`` pointed at the wrong place must fail
    loudly, not have the store list, evict or repair files there. Missing/empty is fine."""
    try:
        names = sorted(e.name for e in os.scandir(root)
                       if not (_SHARD_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False))
                       and not (_SIDECAR_RE.fullmatch(e.name) and e.is_file(follow_symlinks=False)))
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise StoreError(f"store path {root} is a file, not a directory") from None
    if names:
        raise StoreError(
            f"{root} is not a kvboost-rag store: it holds {names[0]!r}"
            + (f" and {len(names) - 1} other foreign entr{'y' if len(names) == 2 else 'ies'}" if len(names) > 1 else "")
            + ", which the store never writes (it only creates two-character shard folders). "
            "Point the store at an empty or dedicated directory.")


def _shard_dirs(root: Path) -> Iterator[Path]:
    """Shard folders of ``root``: real directories (never symlinks) with a shard name."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return
    for e in entries:
        if _SHARD_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False):
            yield Path(e.path)


def _entry_paths(root: Path) -> Iterator[Path]:
    """Every path under ``root`` named like an entry in its own shard (whatever its type: readers
    check)."""
    for shard in _shard_dirs(root):
        yield from _entry_paths_in(root, shard.name)


def _entry_paths_in(root: Path, shard: str) -> Iterator[Path]:
    """The entry-named paths of one shard folder (none if it is missing, not a real directory or
    not named like a shard)."""
    folder = root / shard
    if not _SHARD_RE.fullmatch(shard) or folder.is_symlink():
        return
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return
    for name in names:
        if _is_entry_name(name, shard):
            yield folder / name


# ------------------------------------------------------------------------------ temp files
def _temp_path(path: Path) -> Path:
    """Temp file for an atomic write of ``path``, beside it: host and pid in the name let the next
    open remove it once this writer is gone (see :func:`_stale_temp_files`)."""
    return path.parent / f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


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


def _stale_temp_files(root: Path, older_than_s: float) -> List[Path]:
    """Regular temp files of atomic writes under ``root`` whose writer is gone: on this host with
    a dead pid, or untouched for ``older_than_s``. Another live writer's is never listed."""
    out, now = [], time.time()
    for shard in _shard_dirs(root):
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


# ---------------------------------------------------------------------------- safe reading
def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return name
    return "not a regular file"


def _squatter(path: Path) -> Optional[str]:
    """Why ``path``, an entry's place, holds something the store cannot have written (a
    directory, FIFO, symlink, socket or device), or None (nothing there, or a regular file)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    return f"{_file_kind(mode)} at the entry path is not a file this store wrote; remove it by hand: {path}"


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


def _read_entry(path: Path, *, whole: bool) -> Tuple[Dict[str, str], list, Optional[bytearray]]:
    """Metadata, tensor layout and (if ``whole``) the file in a fresh writable buffer.

    The one way the store reads an entry: a plain file only (see :func:`_open_regular`), and the
    body is read only once the header has accounted for every byte of it
    (:func:`~kvboost_rag.store.entry_format._layout`), so a 20 GB sparse file or a wrong header is
    rejected without allocating anything."""
    with _open_regular(path) as f:
        header, n, size = _header_of(f)
        metadata, specs = _layout(header, n, size)
        if not whole:
            return metadata, specs, None
        data = bytearray(size)
        f.seek(0)
        _read_exactly(f, size, memoryview(data))
    return metadata, specs, data


def _store_wrote(root: Path, path: Path, *, unreadable_ok: bool = False) -> bool:
    """Whether the store rooted at ``root`` wrote ``path``: the only files it ever deletes.

    It must sit where the store puts entries (:func:`_is_entry_name`), be a regular file (never
    a symlink, so nothing outside the root is reachable) and carry the store's ``format`` marker
    in its header. A file whose header cannot be read at all counts only with
    ``unreadable_ok`` (``verify(remove=True)``, i.e. ``inspect --repair``)."""
    if path.parent.parent != root or not _is_entry_name(path.name, path.parent.name):
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
