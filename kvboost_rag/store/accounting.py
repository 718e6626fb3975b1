"""The write counters the persistent stores (disk and object) keep alike: bytes written, keys
known to be damaged, and the running size estimate their eviction reads."""
from __future__ import annotations

__all__ = ["count_write"]


def count_write(store, key: str, nbytes: int) -> None:
    """Account a finished write of ``nbytes`` under ``key`` (a rewritten key is no longer damaged).
    ``store`` has ``_lock``, ``bytes_written``, ``corrupt_keys`` and ``_approx_bytes`` (None until
    its size is first measured)."""
    with store._lock:
        store.bytes_written += nbytes
        if key in store.corrupt_keys:
            store.corrupt_keys.remove(key)
        if store._approx_bytes is not None:
            store._approx_bytes += nbytes
