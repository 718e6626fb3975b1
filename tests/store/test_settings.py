"""A store's recorded settings (store.json): int8 for a new store, kept on reopen, 16-bit for a
store written before settings existed, explicit values win, a damaged file is a clear error."""
import json

import pytest
import torch

from kvboost_rag.config import DEFAULT_KV_BITS
from kvboost_rag.errors import InvalidConfigError, StoreError
from kvboost_rag.store.disk import DiskStore
from kvboost_rag.store.settings import SETTINGS_FILE, read_settings
from kvboost_rag.store.tiered import open_store
from kvboost_rag.testing.store import synthetic_chunk

KEY = "3f" + "a1" * 31
KEY2 = "4e" + "b2" * 31


def _bits(store, key) -> int:
    return next(e.kv_bits for e in store.entries() if e.key == key)


def test_a_new_store_writes_int8_and_records_it(tmp_path):
    assert DEFAULT_KV_BITS == 8
    store = DiskStore(tmp_path / "kv")
    assert store.kv_bits == 8 and not (tmp_path / "kv" / SETTINGS_FILE).exists()  # nothing written yet
    chunk = synthetic_chunk(9, dtype=torch.float32)
    store.put(KEY, chunk)
    assert _bits(store, KEY) == 8
    assert read_settings(tmp_path / "kv") == {"kv_bits": 8}
    got = store.get(KEY, chunk.fingerprint)
    assert got.keys.dtype == chunk.keys.dtype and not torch.equal(got.keys, chunk.keys)  # quantized
    assert DiskStore(tmp_path / "kv").kv_bits == 8  # reopened without options: the recorded setting
    assert DiskStore(tmp_path / "kv").verify() == []  # the settings file is no entry, and no damage


def test_the_recorded_setting_is_kept_and_an_explicit_one_wins(tmp_path):
    sixteen = DiskStore(tmp_path, kv_bits=16)
    chunk = synthetic_chunk(9, dtype=torch.float32)
    sixteen.put(KEY, chunk)
    assert read_settings(tmp_path) == {"kv_bits": 16}
    reopened = DiskStore(tmp_path)
    assert reopened.kv_bits == 16
    assert torch.equal(reopened.get(KEY, chunk.fingerprint).keys, chunk.keys)  # 16-bit: exact
    four = DiskStore(tmp_path, kv_bits=4)  # explicit: this instance writes int4...
    four.put(KEY2, chunk)
    assert _bits(four, KEY2) == 4
    assert read_settings(tmp_path) == {"kv_bits": 16}  # ...the store's recorded setting stays
    assert open_store(tmp_path).kv_bits == 16


def test_a_store_written_before_settings_existed_stays_16_bit(tmp_path):
    DiskStore(tmp_path, kv_bits=16).put(KEY, synthetic_chunk(9))
    (tmp_path / SETTINGS_FILE).unlink()  # as a store from before the settings file
    legacy = DiskStore(tmp_path)
    assert legacy.kv_bits == 16
    legacy.put(KEY2, synthetic_chunk(5))
    assert read_settings(tmp_path) == {"kv_bits": 16}


@pytest.mark.parametrize("content", [b"not json", b"[]", json.dumps({"format": "other", "kv_bits": 8}).encode(),
                                     json.dumps({"format": "kvboost-store-settings-1", "kv_bits": 7}).encode(),
                                     json.dumps({"format": "kvboost-store-settings-1", "kv_bits": True}).encode(),
                                     b"{" + b" " * 5000 + b"}"])
def test_a_damaged_settings_file_is_a_clear_error(tmp_path, content):
    (tmp_path / SETTINGS_FILE).write_bytes(content)
    with pytest.raises(StoreError, match=r"store\.json.*delete"):
        DiskStore(tmp_path)


def test_settings_file_is_the_stores_own(tmp_path):
    """The root check, listing and upkeep treat store.json as the store's: no foreign-file refusal,
    never listed as an entry, left alone by clear()."""
    store = DiskStore(tmp_path)
    store.put(KEY, synthetic_chunk(9))
    assert list(DiskStore(tmp_path).keys()) == [KEY]
    store.clear()
    assert (tmp_path / SETTINGS_FILE).exists() and DiskStore(tmp_path).kv_bits == 8


def test_bad_kv_bits_is_refused(tmp_path):
    with pytest.raises(InvalidConfigError, match="kv_bits"):
        DiskStore(tmp_path, kv_bits=12)
