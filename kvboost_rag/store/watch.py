"""Notice, cheaply, that a store changed under a long-lived engine (another process warmed it).

Automatic document detection only knows the texts the engine loaded from the store when it was
built (``store.texts()``) and the ones it stored itself. Documents warmed later by another
process, or by another engine object on the same directory, would be missed until a restart.

The engine calls :meth:`StoreWatch.changed` only for a prompt in which detection found no
document; when it says yes, the engine re-reads ``store.texts()`` and tokenizes the prompt
again (that prompt pays for the re-scan, once). To keep this cheap:

* the *generation* compared is a few ``stat`` calls, never a scan of entries:
  ``store.generation()`` if a store provides one; for a directory store (anything with a
  ``root``: :class:`~kvboost_rag.store.disk.DiskStore`, ``TieredStore``) the mtime and size of the
  root and of each shard folder (an entry written, replaced or deleted changes its folder's
  mtime); for an in-memory store its entry count, bytes and evictions;
* checks are rate-limited to one per ``interval_s`` (the first one is immediate);
* a generation whose newest mtime is under ``_SETTLE_NS`` old is not trusted (filesystem
  timestamps are coarse: a write in the same tick would not change it), so the next check
  re-scans once more.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Hashable, Optional

_SETTLE_NS = 2_000_000_000


def _dir_generation(root: Path) -> tuple[Hashable, int]:
    """(signature, newest mtime in ns) of a store directory and its shard folders."""
    try:
        st = os.stat(root)
    except OSError:
        return None, 0
    parts = [("", st.st_mtime_ns, st.st_size)]
    newest = st.st_mtime_ns
    try:
        with os.scandir(root) as it:
            for entry in it:
                if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                    continue
                try:
                    s = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                parts.append((entry.name, s.st_mtime_ns, s.st_size))
                newest = max(newest, s.st_mtime_ns)
    except OSError:
        pass
    return tuple(sorted(parts)), newest


def store_generation(store: Any) -> tuple[Hashable, int]:
    """(a value that changes when the store's entries change, newest mtime in ns or 0)."""
    generation = getattr(store, "generation", None)
    if callable(generation):
        return generation(), 0
    root = getattr(store, "root", None)
    if root is not None:
        return _dir_generation(Path(root))
    count = len(store) if hasattr(store, "__len__") else None
    return (count, getattr(store, "nbytes", None), getattr(store, "evictions", None)), 0


class StoreWatch:
    """Remembers a store's generation; :meth:`changed` says whether it moved since."""

    interval_s = 1.0

    def __init__(self, store: Any) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._generation, self._settled = self._read()
        self._last_check: Optional[float] = None
        self.rescans = 0

    def _read(self) -> tuple[Hashable, bool]:
        generation, newest = store_generation(self.store)
        return generation, time.time_ns() - newest > _SETTLE_NS

    def changed(self) -> bool:
        """True (and the new generation remembered) if the store changed since the last check
        that returned True or since construction; at most one check per ``interval_s``."""
        with self._lock:
            now = time.monotonic()
            if self._last_check is not None and now - self._last_check < self.interval_s:
                return False
            self._last_check = now
            generation, settled = self._read()
            if generation == self._generation and self._settled:
                return False
            self._generation, self._settled = generation, settled
            self.rescans += 1
            return True
