"""Notice, cheaply, that a store changed under a long-lived engine (another process warmed it).

Automatic document detection only knows the texts the engine loaded from the store when it was
built (``store.texts()``) and the ones it stored itself. Documents warmed later by another
process, or by another engine object on the same directory, would be missed until a restart, and
a flat prompt holding a known document next to a newly warmed one would reuse only the first.

The engine asks :meth:`StoreWatch.new_texts` before segmenting every prompt that may reuse
stored KV (whatever the prompt holds) and registers what it returns for detection. To keep that
cheap:

* a *directory store* (a :class:`~kvboost_rag.store.disk.DiskStore`, or a tier over one with a
  ``root``) is watched per shard folder: one ``scandir`` of the root and one ``stat`` per shard
  (an entry written, replaced or deleted changes its folder's mtime). Only the folders that
  changed are listed again, and only the headers of entries whose key is not known yet are read
  (``DiskStore.texts(shards=..., skip=...)``), so a re-scan costs the new entries, not the store;
* any other store is compared by *generation*: ``store.generation()`` if it provides one (an
  object store's generation object), else a memory store's entry count, bytes and evictions; a
  change re-reads ``store.texts()`` and keeps the texts of keys not seen before;
* checks are rate-limited to one per ``interval_s`` (the first one is immediate): 0.1 s for a
  directory (a few ``stat`` calls), 1 s for anything else (an object store's generation is a
  request);
* a folder whose mtime is under ``_SETTLE_NS`` old is not trusted (filesystem timestamps are
  coarse: a second write in the same tick would not change it), so the next checks list it
  again until it has settled.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Dict, Hashable, Iterable, List, Optional, Set, Tuple, Union

_SETTLE_NS = 2_000_000_000
DIRECTORY_INTERVAL_S = 0.1
OTHER_INTERVAL_S = 1.0


def _shard_signatures(root: Path) -> Dict[str, Tuple[int, int]]:
    """``{shard folder name: (mtime ns, size)}`` of a store directory (empty if it is missing)."""
    out: Dict[str, Tuple[int, int]] = {}
    try:
        with os.scandir(root) as it:
            for entry in it:
                if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                    continue
                try:
                    s = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                out[entry.name] = (s.st_mtime_ns, s.st_size)
    except OSError:
        pass
    return out


def _dir_generation(root: Path) -> Tuple[Hashable, int]:
    """(signature, newest mtime in ns) of a store directory and its shard folders."""
    try:
        st = os.stat(root)
    except OSError:
        return None, 0
    shards = _shard_signatures(root)
    parts = [("", st.st_mtime_ns, st.st_size)] + [(name, *sig) for name, sig in shards.items()]
    newest = max([st.st_mtime_ns] + [sig[0] for sig in shards.values()])
    return tuple(sorted(parts)), newest


def store_generation(store: Any) -> Tuple[Hashable, int]:
    """(a value that changes when the store's entries change, newest mtime in ns or 0)."""
    generation = getattr(store, "generation", None)
    if callable(generation):
        return generation(), 0
    root = getattr(store, "root", None)
    if root is not None:
        return _dir_generation(Path(root))
    count = len(store) if hasattr(store, "__len__") else None
    return (count, getattr(store, "nbytes", None), getattr(store, "evictions", None)), 0


def _directory_tier(store: Any) -> Any:
    """The DiskStore whose folders show every change of ``store``, or None: the store itself, or
    the disk tier of a memory-over-disk store (whose memory holds only what the disk holds). A
    store with its own ``generation()`` (an object store over a local cache) is not one."""
    if callable(getattr(store, "generation", None)):
        return None
    from kvboost_rag.store.disk import DiskStore

    for candidate in (store, getattr(store, "disk", None)):
        if isinstance(candidate, DiskStore):
            if candidate is store or Path(getattr(store, "root", candidate.root)) == candidate.root:
                return candidate
    return None


class StoreWatch:
    """Remembers what a store looked like; :meth:`new_texts` returns the texts of entries that
    appeared since the last look, :meth:`changed` only whether anything changed."""

    def __init__(self, store: Any, interval_s: Optional[float] = None) -> None:
        self.store = store
        self._disk = _directory_tier(store)
        self.interval_s = (interval_s if interval_s is not None
                           else DIRECTORY_INTERVAL_S if self._disk is not None else OTHER_INTERVAL_S)
        self._lock = threading.Lock()
        self._known: Set[str] = set()
        self._last_check: Optional[float] = None
        self.rescans = 0
        if self._disk is not None:
            self._shards, self._unsettled = self._read_shards()
        else:
            self._generation, self._settled = self._read()

    # ------------------------------------------------------------------ reading
    def _read(self) -> Tuple[Hashable, bool]:
        generation, newest = store_generation(self.store)
        return generation, time.time_ns() - newest > _SETTLE_NS

    def _read_shards(self) -> Tuple[Dict[str, Tuple[int, int]], Set[str]]:
        shards = _shard_signatures(self._disk.root)
        recent = time.time_ns() - _SETTLE_NS
        return shards, {name for name, (mtime, _) in shards.items() if mtime >= recent}

    def _poll(self) -> Union[None, bool, Set[str]]:
        """What changed since the last look (rate-limited): None (nothing, or too soon), the shard
        folders to list again (a directory store), or True (any other store). Holds the lock."""
        now = time.monotonic()
        if self._last_check is not None and now - self._last_check < self.interval_s:
            return None
        self._last_check = now
        if self._disk is not None:
            shards, unsettled = self._read_shards()
            changed = {name for name, sig in shards.items() if self._shards.get(name) != sig} | (self._unsettled & set(shards))
            self._shards, self._unsettled = shards, unsettled
            return changed or None
        generation, settled = self._read()
        if generation == self._generation and self._settled:
            return None
        self._generation, self._settled = generation, settled
        return True

    # ------------------------------------------------------------------ public
    def changed(self) -> bool:
        """True (and the new state remembered) if the store changed since the last check that
        returned True or since construction; at most one check per ``interval_s``."""
        with self._lock:
            if self._poll():
                self.rescans += 1
                return True
            return False

    def load(self, fingerprint: str) -> List[Tuple[str, str]]:
        """Every ``(key, text)`` the store holds for ``fingerprint`` (the engine's first scan);
        their keys are known from now on."""
        texts = getattr(self.store, "texts", None)
        items = list(texts(fingerprint)) if callable(texts) else []
        with self._lock:
            self._known.update(key for key, _ in items)
        return items

    def new_texts(self, fingerprint: str) -> List[Tuple[str, str]]:
        """``(key, text)`` of entries for ``fingerprint`` that appeared since the last look (empty
        when nothing changed or the last check was under ``interval_s`` ago)."""
        with self._lock:
            changes = self._poll()
            if not changes:
                return []
            self.rescans += 1
            if changes is True:
                texts = getattr(self.store, "texts", None)
                items: Iterable[Tuple[str, str]] = texts(fingerprint) if callable(texts) else ()
            else:
                items = self._disk.texts(fingerprint, shards=changes, skip=self._known)
            new = [(key, text) for key, text in items if key not in self._known]
            self._known.update(key for key, _ in new)
            return new
