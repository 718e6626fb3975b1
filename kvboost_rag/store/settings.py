"""A disk store's own settings, kept beside its shard folders in ``store.json``.

What a store was created with (today: ``kv_bits``, the bits per stored KV value), so that opening
it later without options writes new entries the way its first ones were written. The file is
written once, atomically, with the store's first entry; it is JSON read with strict checks (never
unpickled), and a damaged one is a clear :class:`~kvboost_rag.errors.StoreError` naming it.

How ``kv_bits`` is resolved when a store is opened (:func:`resolve_kv_bits`): the caller's value
if given; else the recorded one; else 16 for a store that already holds entries (they predate the
file and were written in 16 bits); else :data:`~kvboost_rag.config.DEFAULT_KV_BITS` for a new
store. Entries of any ``kv_bits`` stay readable whatever the setting.
"""
from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Optional

from kvboost_rag.config import DEFAULT_KV_BITS
from kvboost_rag.errors import StoreError
from kvboost_rag.files import atomic_file
from kvboost_rag.kv.quantize import check_bits

__all__ = ["SETTINGS_FILE", "read_settings", "write_settings", "resolve_kv_bits"]

log = logging.getLogger(__name__)

SETTINGS_FILE = "store.json"
_FORMAT = "kvboost-store-settings-1"
_MAX_BYTES = 4096  # a settings file is a few dozen bytes; anything larger is not ours


def read_settings(root: Path) -> dict:
    """The settings recorded in ``root`` (``{}`` when there are none)."""
    path = Path(root) / SETTINGS_FILE
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_BYTES + 1)
    except FileNotFoundError:
        return {}
    except IsADirectoryError:
        raise StoreError(f"{path} is a directory; the store keeps its settings in this file") from None
    except PermissionError:  # a store another user made read-only: its readers need no settings
        log.warning("cannot read %s (permission denied): kv_bits taken from the options given", path)
        return {}
    fix = f"delete {path} (the store then takes kv_bits from the options it is opened with)"
    if len(raw) > _MAX_BYTES:
        raise StoreError(f"{path} is not a kvboost-rag settings file (over {_MAX_BYTES} bytes): {fix}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise StoreError(f"{path} is damaged ({exc}): {fix}") from None
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise StoreError(f"{path} is not a kvboost-rag settings file (format {_FORMAT!r} expected): {fix}")
    bits = data.get("kv_bits")
    if isinstance(bits, bool) or bits not in (16, 8, 4):
        raise StoreError(f"{path} records kv_bits={bits!r}; one of 16, 8, 4 expected: {fix}")
    return {"kv_bits": bits}


def write_settings(root: Path, settings: dict, *, fsync: bool = True) -> None:
    """Record ``settings`` in ``root`` (atomically; the directory must exist)."""
    body = json.dumps({"format": _FORMAT, **settings}, sort_keys=True).encode("utf-8")
    target = Path(root) / SETTINGS_FILE
    temp = target.with_name(f"{SETTINGS_FILE}.{secrets.token_hex(8)}.tmp")  # readable by all, as entries are
    with atomic_file(target, temp=temp, fsync=fsync, sync_dir=fsync) as f:
        f.write(body)


def resolve_kv_bits(requested: Optional[int], recorded: Optional[int], has_entries: bool) -> int:
    """The ``kv_bits`` a store opened with ``requested`` (None: not given) writes with."""
    if requested is not None:
        return check_bits(requested)
    if recorded is not None:
        return recorded
    return 16 if has_entries else DEFAULT_KV_BITS
