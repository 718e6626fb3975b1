"""Co-retrieval: which stored documents arrive in prompts together, learned from traffic.

Embedding neighbours are a guess at which documents a retriever returns together; the prompts an
engine serves are the record. :class:`CoRetrieval` counts, for every document (by its isolated
store key, a content hash), how often each other document sat in the same prompt. When a
document keeps arriving with partners that are not in the context it was encoded with, the
write-behind worker re-encodes it with its most frequent partners as context
(:func:`kvboost_rag.index.job.encode_in_context`), replacing the entry under the same key.

Bounded: at most ``max_docs`` documents (least recently seen dropped first) with at most
``max_partners`` partners each (the rarest dropped first). Persistent: a small JSON file next to
a disk store, written atomically.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Optional, Sequence

from kvboost_rag.files import atomic_file

log = logging.getLogger("kvboost_rag")

FILE_NAME = "coretrieval.json"
_FORMAT = "kvboost-rag-coretrieval/1"


def coretrieval_path(store) -> Optional[Path]:
    """Where a store keeps its co-retrieval table: next to a disk store's entries (a file the
    store recognises as its own), None for a store without a directory (kept in memory only)."""
    disk = getattr(store, "disk", store)
    root = getattr(disk, "root", None)
    return Path(root) / FILE_NAME if isinstance(root, (str, Path)) else None


class CoRetrieval:
    """Counts of documents retrieved together (see the module docstring). Thread-safe."""

    def __init__(self, path: Optional[Path] = None, *, max_docs: int = 4096, max_partners: int = 16,
                 save_every: int = 32) -> None:
        self.path = Path(path) if path is not None else None
        self.max_docs = max_docs
        self.max_partners = max_partners
        self.save_every = save_every
        self._counts: "OrderedDict[str, dict[str, int]]" = OrderedDict()
        self._lock = threading.Lock()
        self._unsaved = 0
        if self.path is not None:
            self._load()

    def __len__(self) -> int:
        return len(self._counts)

    def record(self, keys: Sequence[str]) -> None:
        """One prompt's documents: every pair's count goes up by one."""
        keys = list(dict.fromkeys(keys))
        if len(keys) < 2:
            return
        with self._lock:
            for key in keys:
                partners = self._counts.pop(key, None) or {}
                for other in keys:
                    if other != key:
                        partners[other] = partners.get(other, 0) + 1
                if len(partners) > self.max_partners:
                    for other, _ in sorted(partners.items(), key=lambda kv: kv[1])[: len(partners) - self.max_partners]:
                        del partners[other]
                self._counts[key] = partners
            while len(self._counts) > self.max_docs:
                self._counts.popitem(last=False)
            self._unsaved += 1
            due = self.path is not None and self._unsaved >= self.save_every
        if due:
            self.save()

    def partners(self, key: str, n: int, *, among: Optional[Iterable[str]] = None, min_count: int = 2) -> list[str]:
        """``key``'s ``n`` most frequent partners seen at least ``min_count`` times (most frequent
        first; ties by key), optionally only those in ``among``."""
        allowed = set(among) if among is not None else None
        with self._lock:
            counts = dict(self._counts.get(key, {}))
        ranked = sorted(((c, k) for k, c in counts.items()
                         if c >= min_count and (allowed is None or k in allowed)), key=lambda ck: (-ck[0], ck[1]))
        return [k for _, k in ranked[:n]]

    def count(self, a: str, b: str) -> int:
        with self._lock:
            return self._counts.get(a, {}).get(b, 0)

    # ------------------------------------------------------------------ persistence
    def save(self) -> None:
        """Write the table atomically (no-op without a path); errors are logged, never raised."""
        if self.path is None:
            return
        with self._lock:
            data = json.dumps({"format": _FORMAT, "counts": self._counts}).encode()
            self._unsaved = 0
        try:
            with atomic_file(self.path) as out:
                out.write(data)
        except OSError as exc:
            log.warning("kvboost_rag: could not save the co-retrieval table %s: %s", self.path, exc)

    def _load(self) -> None:
        """Read the table; a missing, unreadable or malformed file starts an empty one."""
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("kvboost_rag: ignoring the co-retrieval table %s: %s", self.path, exc)
            return
        counts = raw.get("counts") if isinstance(raw, dict) and raw.get("format") == _FORMAT else None
        if not isinstance(counts, dict):
            log.warning("kvboost_rag: ignoring the co-retrieval table %s: not a %s file", self.path, _FORMAT)
            return
        for key, partners in list(counts.items())[-self.max_docs:]:
            if isinstance(key, str) and isinstance(partners, dict):
                self._counts[key] = {k: int(c) for k, c in partners.items()
                                     if isinstance(k, str) and isinstance(c, int) and not isinstance(c, bool) and c > 0}
