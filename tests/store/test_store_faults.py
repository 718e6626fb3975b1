"""DiskStore under hostile file-system states: foreign files, bad entry files, stale temp files.

Each of these was a crash, a hang or a deleted foreign file before the store checked ownership,
file types and header types (issue 12)."""
import json
import os
import subprocess
import threading

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kvboost_rag.testing.store import PYTHON, python_env, synthetic_chunk
from kvboost_rag.app.cli import main
from kvboost_rag.store.disk import DiskStore
from kvboost_rag.store.entry_format import _checksum, _dtype_name, _tensor_bytes
from kvboost_rag.store.safe_files import _HOST
from kvboost_rag.errors import StoreError

KEY = "3f" + "a1" * 31
OTHER = "3f" + "b2" * 31
FOREIGN = b"foreign bytes the store must never delete"


def within(seconds, fn, *args):
    """``fn(*args)``, failing (not hanging) if it runs past ``seconds``: a FIFO read would block."""
    out = {}

    def target():
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # re-raised in the test's thread
            out["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)} hung for {seconds}s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def rewritten(blob: bytes, **fields) -> bytes:
    """``blob`` (an entry) with header fields replaced and a *valid* checksum recomputed, so only
    the field validation (not the checksum) can catch them."""
    import struct

    (n,) = struct.unpack("<Q", blob[:8])
    metadata = json.loads(blob[8 : 8 + n])["__metadata__"]
    metadata.update(fields)
    metadata.pop("xxh3_128")
    tensors = st_load(blob)
    pieces = [(k, _dtype_name(t.dtype), list(t.shape), _tensor_bytes(t)) for k, t in tensors.items()]
    metadata["xxh3_128"] = _checksum(metadata, pieces, "xxh3_128")
    return st_save(tensors, metadata=metadata)


def good_blob(tmp_path) -> bytes:
    scratch = DiskStore(tmp_path / "scratch")
    scratch.put(KEY, synthetic_chunk(6))
    return scratch.path_for(KEY).read_bytes()


# ------------------------------------------------------------------ foreign files
def test_a_folder_with_foreign_files_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(FOREIGN)
    with pytest.raises(StoreError, match=r"not a kvboost-rag store.*config\.json") as info:
        DiskStore(model)
    assert str(model) in str(info.value)
    assert (model / "model.safetensors").read_bytes() == FOREIGN
    (model / "config.json").unlink()
    with pytest.raises(StoreError, match="model.safetensors"):
        DiskStore(model)
    # missing, empty, or holding only the store's own shard folders: fine
    DiskStore(tmp_path / "missing")
    DiskStore(tmp_path / "missing").put(KEY, synthetic_chunk(3))
    assert DiskStore(tmp_path / "missing").get(KEY, "fp-a") is not None


def test_only_files_the_store_wrote_are_ever_deleted(tmp_path):
    """clear(), eviction and verify(remove=True) leave alone: a foreign safetensors named like an
    entry in its shard, a file outside the root reached through a symlinked entry or a symlinked
    shard, and a garbage file sitting outside the store's layout."""
    root = tmp_path / "store"
    store = DiskStore(root, max_bytes=10**9)
    for i in range(3):
        store.put(f"{i:02d}" + "c" * 30, synthetic_chunk(4, seed=i))
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "model.safetensors"
    target.write_bytes(st_save({"w": torch.ones(4)}, metadata={"format": "pt"}))
    foreign_in_layout = root / "mo" / "model.safetensors"  # a valid key name in its own shard
    foreign_in_layout.parent.mkdir()
    foreign_in_layout.write_bytes(target.read_bytes())
    misplaced = root / "00" / ("zz" + "c" * 30 + ".safetensors")  # wrong shard: not the store's layout
    misplaced.write_bytes(b"\0" * 16)
    (root / "ab").mkdir()
    (root / "ab" / ("ab" + "d" * 30 + ".safetensors")).symlink_to(target)
    victim_dir = outside / "cd"
    victim_dir.mkdir()
    victim = victim_dir / ("cd" + "e" * 30 + ".safetensors")
    victim.write_bytes(store.path_for("00" + "c" * 30).read_bytes())  # a genuine entry, but outside the root
    (root / "cd").symlink_to(victim_dir, target_is_directory=True)

    survivors = [target, foreign_in_layout, misplaced, victim]
    bad = dict(store.verify(remove=True))
    assert set(bad) == {"model", "ab" + "d" * 30}
    assert all("left in place" in r for r in bad.values())
    store.max_bytes = 1
    store.put("ff" + "c" * 30, synthetic_chunk(4))  # evicts everything it may
    assert store.evictions == 3
    store.clear()
    assert all(p.exists() for p in survivors)
    assert target.read_bytes() == foreign_in_layout.read_bytes()
    assert (root / "ab" / ("ab" + "d" * 30 + ".safetensors")).is_symlink()
    assert not any(store.path_for(f"{i:02d}" + "c" * 30).exists() for i in range(3)), "its own entries are gone"
    assert not store.delete("model")


def test_unreadable_header_is_removed_only_by_repair(tmp_path):
    store = DiskStore(tmp_path)
    path = store.path_for(KEY)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x07" * 64)  # no parsable header: cannot prove who wrote it
    assert store.get(KEY, "fp-a") is None and not store.contains(KEY, "fp-a")
    assert store.corrupt_keys == [KEY]
    store.clear()
    assert path.exists(), "get/contains/clear leave a file they cannot identify"
    assert [k for k, _ in store.verify()] == [KEY] and path.exists()
    assert [k for k, _ in store.verify(remove=True)] == [KEY]
    assert not path.exists(), "--repair removes it: named and placed exactly like an entry"


# ------------------------------------------------------------------ temp files
def test_temp_files_of_dead_writers_are_removed_on_open(tmp_path):
    DiskStore(tmp_path).put(KEY, synthetic_chunk(3))
    shard = tmp_path / KEY[:2]
    dead = subprocess.run([PYTHON, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    stale = shard / f".{KEY}.safetensors.{_HOST}.{int(dead)}.0123abcd.tmp"
    live = shard / f".{KEY}.safetensors.{_HOST}.{os.getpid()}.4567abcd.tmp"
    elsewhere = shard / f".{KEY}.safetensors.otherhost.{int(dead)}.89abcdef.tmp"  # pid not checkable here
    for p in (stale, live, elsewhere):
        p.write_bytes(b"partial")
    store = DiskStore(tmp_path)
    assert not stale.exists(), "its writer is dead"
    assert live.exists() and elsewhere.exists(), "a live (or unknown) writer's temp file is kept"
    old = 1_000_000_000
    os.utime(elsewhere, (old, old))
    assert store.stale_temp_files() == [elsewhere]
    assert main(["inspect", "--store", str(tmp_path), "--verify", "--repair"]) == 0
    assert not elsewhere.exists() and live.exists()
    assert store.get(KEY, "fp-a") is not None


# ------------------------------------------------------------------ bad entry files
def make_bad(kind: str, path, tmp_path, monkeypatch=None):
    """Put a bad file of ``kind`` where the entry ``path`` belongs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = good_blob(tmp_path)
    if kind == "directory":
        path.mkdir()
        (path / "inner").write_bytes(FOREIGN)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "sparse-20GB":
        path.write_bytes(blob)
        os.truncate(path, 20 << 30)
    elif kind == "zeros-20GB":
        with open(path, "wb") as f:
            f.truncate(20 << 30)
    elif kind == "symlink-outside":
        (tmp_path / "outside.safetensors").write_bytes(blob)
        path.symlink_to(tmp_path / "outside.safetensors")
    elif kind == "unreadable":
        path.write_bytes(blob)
        real_open = os.open

        def deny(p, *a, **k):
            if os.fspath(p) == os.fspath(path):
                raise PermissionError(13, "Permission denied", os.fspath(p))
            return real_open(p, *a, **k)

        monkeypatch.setattr(os, "open", deny)
    elif kind.startswith("header:"):
        fields = json.loads(kind[len("header:"):])
        path.write_bytes(rewritten(blob, **fields))
    else:
        raise AssertionError(kind)


BAD_KINDS = ["directory", "fifo", "sparse-20GB", "zeros-20GB", "symlink-outside", "unreadable",
             'header:{"num_tokens": "q0"}', 'header:{"start": "x"}', 'header:{"shape": "[1, 2, 3, 4]"}',
             'header:{"shape": "{\\"a\\": 1}"}', 'header:{"kv_bits": "7"}', 'header:{"dtype": "int64"}',
             'header:{"num_tokens": "5"}', 'header:{"meta": "[1]"}']


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_a_bad_entry_file_is_a_miss_and_reported(tmp_path, kind, monkeypatch):
    store = DiskStore(tmp_path / "store")
    store.put(OTHER, synthetic_chunk(5))
    path = store.path_for(KEY)
    make_bad(kind, path, tmp_path, monkeypatch)
    bad = within(20, store.verify)
    assert [k for k, _ in bad] == [KEY], bad
    assert [e.key for e in within(20, lambda: list(store.entries()))] == [OTHER]
    assert [k for k, _ in within(20, lambda: list(store.texts("fp-a")))] == [OTHER]
    assert within(20, store.contains, KEY, "fp-a") is False  # (removes the entry if the store wrote it)
    assert within(20, store.get, KEY, "fp-a") is None
    assert KEY in store.corrupt_keys and store.corrupt >= 1
    assert within(20, store.get, OTHER, "fp-a") is not None, "the good entry next to it still serves"
    if kind == "directory":
        assert (path / "inner").read_bytes() == FOREIGN


def test_unreadable_entry_with_real_permissions(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads mode-000 files; the 'unreadable' case above simulates it")
    store = DiskStore(tmp_path)
    store.put(KEY, synthetic_chunk(4))
    store.path_for(KEY).chmod(0)
    assert store.get(KEY, "fp-a") is None and not store.contains(KEY, "fp-a")
    assert [k for k, _ in store.verify()] == [KEY]


def test_inspect_verify_names_each_bad_entry_without_a_traceback(tmp_path):
    """Through the real CLI (a subprocess, so a hang is a timeout, not a stuck test run)."""
    root = tmp_path / "store"
    store = DiskStore(root)
    store.put(OTHER, synthetic_chunk(5))
    keys = {}
    for i, kind in enumerate(["directory", "fifo", "sparse-20GB", "symlink-outside", 'header:{"num_tokens": "q0"}']):
        key = f"{i:02d}" + "f" * 30
        make_bad(kind, store.path_for(key), tmp_path / f"k{i}")
        keys[key] = kind

    def cli(*args):
        return subprocess.run([PYTHON, "-m", "kvboost_rag.app.cli", "inspect", "--store", str(root), *args],
                              env=python_env(), capture_output=True, text=True, timeout=120)

    out = cli("--verify")
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert f"CORRUPT    {len(keys)} entries" in out.stdout
    lines = out.stdout.splitlines()
    for key in keys:
        assert sum(line.strip().startswith(f"{key}:") for line in lines) == 1, (key, out.stdout)
    assert "entries    1" in out.stdout and f"unreadable {len(keys)}" in out.stdout
    out = cli("--verify", "--repair", "--json")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    summary = json.loads(out.stdout)
    assert {c["key"] for c in summary["corrupt"]} == set(keys)
    remaining = {p.name[:32] for p in root.glob("*/*.safetensors")}
    assert remaining == {OTHER[:32], "00" + "f" * 30, "01" + "f" * 30, "03" + "f" * 30}, \
        "repair removed the store's own damaged files, not the directory, FIFO or symlink"
    assert (tmp_path / "k3" / "outside.safetensors").exists()

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(FOREIGN)
    out = subprocess.run([PYTHON, "-m", "kvboost_rag.app.cli", "inspect", "--store", str(model), "--verify", "--repair"],
                         env=python_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "not a kvboost-rag store" in out.stderr and "Traceback" not in out.stderr
    assert (model / "model.safetensors").read_bytes() == FOREIGN
