"""Upkeep of a :class:`~kvboost_rag.store.disk.DiskStore` directory: full verification of every
entry, temp files left by writers that are gone, and LRU eviction under the disk budget.

:class:`DiskUpkeep` is mixed into ``DiskStore``, which provides what these methods rely on: its
``root``, ``max_bytes``, lock and counters, ``_iter_paths`` (every entry path), and the deletion
rule (``_remove`` and ``_mark_corrupt`` delete only files the store wrote,
:mod:`~kvboost_rag.store.safe_files`). Reads, writes and that rule stay in :mod:`~kvboost_rag.store.disk`.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import List, Tuple

import torch

from kvboost_rag.store.entry_format import SUFFIX, _deserialize, _to_chunk
from kvboost_rag.store.safe_files import STALE_TEMP_AGE_S, _read_entry, _squatter, _stale_temp_files

__all__ = ["DiskUpkeep"]


class DiskUpkeep:
    """``verify``, stale temp files and eviction of a directory store (see the module docstring)."""

    def verify(self, *, remove: bool = False) -> List[Tuple[str, str]]:
        """Fully check every entry (parse + checksum + tensor shapes against ``num_tokens`` and the
        token ids, ``start >= 0``, finite keys and values). Returns ``(key, reason)`` for each bad
        one (a directory, FIFO or symlink in an entry's place included); with ``remove=True`` also
        deletes those the store wrote, so they get recomputed. It does not know the model: whether
        an entry fits one (layers, heads, context window) is checked when it is fetched."""
        bad = []
        for path in list(self._iter_paths()):
            key = path.name[: -len(SUFFIX)]
            try:
                st = os.lstat(path)
                chunk = _to_chunk(*_deserialize(*_read_entry(path, whole=True)))
                for name, t in (("keys", chunk.keys), ("values", chunk.values)):
                    if not bool(torch.isfinite(t).all()):
                        raise ValueError(f"non-finite {name} (NaN or infinity)")
            except FileNotFoundError:
                continue
            except MemoryError:
                raise
            except Exception as exc:
                squatter = _squatter(path)
                if squatter is not None:  # never the store's: named, never removed
                    bad.append((key, squatter + (" (left in place)" if remove else "")))
                    continue
                reason = f"{type(exc).__name__}: {exc}"
                if remove and not self._mark_corrupt(key, path, reason, st, unreadable_ok=True):
                    reason += " (left in place: not a file this store wrote)"
                bad.append((key, reason))
        return bad

    def stale_temp_files(self, older_than_s: float = STALE_TEMP_AGE_S) -> List[Path]:
        """Temp files of atomic writes whose writer is gone: on this host with a dead pid, or
        untouched for ``older_than_s``. Another live writer's temp file is never listed."""
        return _stale_temp_files(self.root, older_than_s)

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

    def _maybe_evict(self, keep: Path) -> None:
        """Past ``max_bytes``, delete the least recently used entries the store wrote (file mtime),
        never ``keep``. The directory is scanned only when the running total says so."""
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
