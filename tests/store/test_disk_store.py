"""DiskStore / TieredStore: round trips, corruption, model isolation, LRU, concurrency."""
import logging
import os
import struct
import subprocess
import textwrap
import time

import pytest
import torch

from kvboost_rag.testing.store import PYTHON, python_env, synthetic_chunk
from kvboost_rag.store.disk import DiskStore, default_store_dir
from kvboost_rag.store.tiered import TieredStore, open_store
from kvboost_rag.errors import InvalidConfigError, StoreError
from kvboost_rag.store.memory import KVStore, MemoryStore

KEY = "3f" + "a1" * 31


def _data_offset(path) -> int:
    """Byte offset where tensor data starts in a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_exact(tmp_path, dtype):
    store = DiskStore(tmp_path, kv_bits=16)  # exact: 16-bit entries
    assert isinstance(store, KVStore)
    chunk = synthetic_chunk(9, dtype=dtype, text="héllo\n\nworld")
    store.put(KEY, chunk)
    path = store.path_for(KEY)
    assert path.parent.name == KEY[:2] and path.name == KEY + ".safetensors"
    got = store.get(KEY, chunk.fingerprint)
    assert torch.equal(got.keys, chunk.keys) and torch.equal(got.values, chunk.values)
    assert got.keys.dtype == dtype
    assert got.token_ids == chunk.token_ids and got.start == chunk.start
    assert got.text == chunk.text and got.meta == chunk.meta and got.fingerprint == chunk.fingerprint
    assert store.contains(KEY, chunk.fingerprint)
    assert not list(tmp_path.rglob("*.tmp")), "temp files must be renamed away"
    # the file is plain safetensors: header strings + tensors, token ids as an int32 tensor
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == {"keys", "values", "token_ids"}
        assert f.get_tensor("token_ids").dtype == torch.int32
    for field in ("fingerprint", "encoding_version", "num_tokens", "dtype", "start", "created", "last_used",
                  "kv_bits", "text", "xxh3_128"):
        assert field in meta, field
    assert meta["num_tokens"] == "9" and meta["encoding_version"] == "1"


def test_text_none_round_trips(tmp_path):
    store = DiskStore(tmp_path)
    store.put(KEY, synthetic_chunk(3, text=None))
    assert store.get(KEY, "fp-a").text is None
    assert list(store.texts("fp-a")) == []


def test_other_fingerprint_is_never_served(tmp_path):
    store = DiskStore(tmp_path)
    store.put(KEY, synthetic_chunk(5, fingerprint="model-A"))
    assert store.get(KEY, "model-B") is None
    assert not store.contains(KEY, "model-B")
    assert store.mismatches == 1 and store.corrupt == 0
    assert list(store.texts("model-B")) == []
    assert store.get(KEY, "model-A") is not None  # still there for its own model


def test_truncated_entry_is_a_miss_and_replaced_on_put(tmp_path, caplog):
    store = DiskStore(tmp_path, kv_bits=16)  # exact: 16-bit entries
    chunk = synthetic_chunk(20)
    store.put(KEY, chunk)
    path = store.path_for(KEY)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 37)
    with caplog.at_level(logging.WARNING, logger="kvboost_rag.store.disk"):
        assert not store.contains(KEY, chunk.fingerprint)  # header+length check catches truncation
    assert store.get(KEY, chunk.fingerprint) is None
    assert store.corrupt_keys == [KEY] and store.corrupt >= 1
    assert "corrupt entry" in caplog.text
    store.put(KEY, chunk)
    assert store.corrupt_keys == []
    assert torch.equal(store.get(KEY, chunk.fingerprint).keys, chunk.keys)


@pytest.mark.parametrize("where", ["tensor", "header-text", "last-byte"])
def test_bit_flip_is_detected_never_served(tmp_path, where):
    store = DiskStore(tmp_path)
    chunk = synthetic_chunk(20, text="some document text")
    store.put(KEY, chunk)
    path = store.path_for(KEY)
    raw = bytearray(path.read_bytes())
    if where == "tensor":
        pos = _data_offset(path) + 100
    elif where == "header-text":
        pos = raw.index(b"some document") + 2
    else:
        pos = len(raw) - 1
    raw[pos] ^= 0x01
    path.write_bytes(bytes(raw))
    assert len(store.verify()) == 1  # inspect --verify sees it
    assert store.get(KEY, chunk.fingerprint) is None
    assert store.corrupt_keys == [KEY]
    assert not path.exists(), "a corrupt entry is removed so that the next warm recomputes it"
    assert not store.contains(KEY, chunk.fingerprint)
    assert store.verify() == []


def test_entries_checksummed_with_sha256_stay_readable_and_verified(tmp_path):
    """``tests/data/sha256_entry.safetensors`` was written by the DiskStore of commit ca78076, which
    checksummed with sha256: it is still served, and still checked (with sha256)."""
    import shutil
    from pathlib import Path

    store = DiskStore(tmp_path)
    chunk = synthetic_chunk(5, text="entry written by kvboost-rag 0.x with a sha256 checksum")
    path = store.path_for(KEY)
    path.parent.mkdir(parents=True)
    shutil.copy(Path(__file__).parent / "data" / "sha256_entry.safetensors", path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert "sha256" in f.metadata() and "xxh3_128" not in f.metadata()
    got = store.get(KEY, chunk.fingerprint)
    assert torch.equal(got.keys, chunk.keys) and torch.equal(got.values, chunk.values)
    assert got.text == chunk.text and store.verify() == []
    raw = bytearray(path.read_bytes())
    raw[_data_offset(path) + 7] ^= 0x10
    path.write_bytes(bytes(raw))
    assert store.get(KEY, chunk.fingerprint) is None and store.corrupt_keys == [KEY]


def test_entry_without_a_checksum_is_corrupt(tmp_path):
    from safetensors.torch import save

    store = DiskStore(tmp_path)
    store.put(KEY, synthetic_chunk(6))
    path = store.path_for(KEY)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "xxh3_128"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    unchecked = save(tensors, metadata=meta)
    path.write_bytes(unchecked)
    assert store.get(KEY, "fp-a") is None and store.corrupt == 1 and not path.exists()
    path.write_bytes(unchecked)
    assert not store.contains(KEY, "fp-a") and store.corrupt == 2


def test_fetched_tensors_are_private_to_the_reader(tmp_path):
    """get() returns views of its own read buffer: writing to them changes neither the file nor
    the next fetch."""
    store = DiskStore(tmp_path, kv_bits=16)  # exact: 16-bit entries
    chunk = synthetic_chunk(8)
    store.put(KEY, chunk)
    first = store.get(KEY, chunk.fingerprint)
    first.keys.zero_()
    again = store.get(KEY, chunk.fingerprint)
    assert torch.equal(again.keys, chunk.keys) and store.verify() == []


def test_garbage_file_is_corrupt(tmp_path):
    store = DiskStore(tmp_path)
    path = store.path_for(KEY)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00" * 5)
    assert not store.contains(KEY, "fp-a")
    assert store.get(KEY, "fp-a") is None


def test_texts_reads_headers_and_entries(tmp_path):
    store = DiskStore(tmp_path)
    for i in range(3):
        store.put(f"{i:02d}" + "c" * 30, synthetic_chunk(4, fingerprint="A", text=f"text {i}"))
    store.put("ff" + "c" * 30, synthetic_chunk(4, fingerprint="B", text="other"))
    assert sorted(t for _, t in store.texts("A")) == ["text 0", "text 1", "text 2"]
    infos = list(store.entries())
    assert len(infos) == 4 == len(store)
    assert {i.fingerprint for i in infos} == {"A", "B"}
    assert store.nbytes == sum(i.nbytes for i in infos)


def test_lru_eviction_by_last_use(tmp_path):
    one = synthetic_chunk(16)
    size = DiskStore(tmp_path / "probe").put(KEY, one)
    store = DiskStore(tmp_path / "s", max_bytes=int(size * 3.5))
    keys = [f"{i:02d}" + "e" * 30 for i in range(3)]
    for i, k in enumerate(keys):
        store.put(k, one)
        os.utime(store.path_for(k), (1000 + i, 1000 + i))  # deterministic ages
    assert store.get(keys[0], one.fingerprint) is not None  # touch: now the most recent
    assert store.path_for(keys[0]).stat().st_mtime > 1e9
    store.put("aa" + "e" * 30, one)  # over budget: evict the least recently used, keys[1]
    present = set(store.keys())
    assert keys[1] not in present and keys[0] in present and keys[2] in present
    assert store.evictions == 1 and store.nbytes <= store.max_bytes


def test_tiered_store_promotes_and_writes_both(tmp_path):
    disk = DiskStore(tmp_path, kv_bits=8)
    tiered = TieredStore(MemoryStore(max_bytes=None), disk)
    chunk = synthetic_chunk(10)
    tiered.put(KEY, chunk)
    assert tiered.memory.contains(KEY, "fp-a") and disk.contains(KEY, "fp-a")
    in_memory = tiered.get(KEY, "fp-a")
    from_disk = disk.get(KEY, "fp-a")
    assert torch.equal(in_memory.keys, from_disk.keys), "memory holds what disk would return (quantized)"
    fresh = TieredStore(MemoryStore(max_bytes=None), DiskStore(tmp_path))
    assert not fresh.memory.contains(KEY, "fp-a")
    assert fresh.get(KEY, "fp-a") is not None and fresh.memory.contains(KEY, "fp-a")
    assert fresh.get(KEY, "other-model") is None
    assert [t for _, t in fresh.texts("fp-a")] == ["doc"]


def test_default_dir_respects_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KVBOOST_RAG_HOME", str(tmp_path / "home"))
    assert default_store_dir() == tmp_path / "home" / "store"
    assert open_store().root == tmp_path / "home" / "store"
    monkeypatch.delenv("KVBOOST_RAG_HOME")
    assert default_store_dir() == os.path.expanduser("~/.cache/kvboost_rag/store") or \
        str(default_store_dir()) == os.path.expanduser("~/.cache/kvboost_rag/store")


def test_bad_keys_and_urls(tmp_path):
    store = DiskStore(tmp_path)
    for bad in ("../../etc", "a/b", "", "x", ".hidden"):
        with pytest.raises(StoreError):
            store.path_for(bad)
    with pytest.raises(InvalidConfigError):
        DiskStore("s3://bucket/prefix")
    assert DiskStore(f"file://{tmp_path}").root == tmp_path


WRITER = textwrap.dedent("""
    import sys, torch
    from kvboost_rag.testing.store import synthetic_chunk
    from kvboost_rag.store.disk import DiskStore
    store = DiskStore(sys.argv[1])
    for i in range(int(sys.argv[2])):
        store.put(sys.argv[3], synthetic_chunk(300, seed=i, text=f"version {i}"))
""")


def test_reader_while_writer_rewrites(tmp_path):
    """A reader polling an entry that another process keeps replacing only ever sees complete,
    valid versions (atomic rename), never a partial file."""
    proc = subprocess.Popen([PYTHON, "-c", WRITER, str(tmp_path), "12", KEY], env=python_env())
    store = DiskStore(tmp_path)
    seen = set()
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        chunk = store.get(KEY, "fp-a")
        if chunk is not None:
            seen.add(chunk.text)
        time.sleep(0.002)  # leave the writer some CPU on small machines
    assert proc.wait(timeout=60) == 0
    assert store.corrupt == 0 and store.corrupt_keys == []
    assert store.get(KEY, "fp-a").text == "version 11"
    assert seen <= {f"version {i}" for i in range(12)}
    assert not list(tmp_path.rglob("*.tmp"))
