"""A store this process may read but not write (another user's, a read-only mount): readers get
every entry and misses for the rest, never a crash; writers get a clear error, and a warm job
fails each document with that reason and goes on. Runs as user ``nobody`` (os.setuid in a
subprocess, after every import), so it needs root; skipped otherwise."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import pytest

from kvboost_rag.store.disk import DiskStore
from kvboost_rag.testing.store import PYTHON, FakeEngine, make_docs, python_env

NOBODY = 65534

AS_NOBODY = r"""
import json, os, sys
from kvboost_rag.app.warm import warm_corpus
from kvboost_rag.errors import StoreError
from kvboost_rag.store.disk import DiskStore
from kvboost_rag.store.memory import MemoryStore
from kvboost_rag.testing.store import FakeEngine, make_docs
warm_corpus(make_docs(2, seed=9), FakeEngine(store=MemoryStore()), progress=False)  # every lazy import, now
root, docs = sys.argv[1], make_docs(int(sys.argv[2]), seed=1)
os.setgid(65534)
os.setuid(65534)
out = {}
try:
    open(os.path.join(root, "probe"), "w")
    out["writable"] = True
except PermissionError:
    out["writable"] = False
store = DiskStore(root)
engine = FakeEngine(store=store)
keys = [engine.chunk_key(engine.tokenize_document(d)) for d in docs]
out["hits"] = sum(store.get(k, engine.fingerprint) is not None for k in keys[:3])
out["contains"] = sum(store.contains(k, engine.fingerprint) for k in keys[:3])
out["miss"] = store.get(keys[3], engine.fingerprint) is None
out["texts"] = len(list(store.texts(engine.fingerprint)))
try:
    store.put(keys[3], engine.encode_batch([docs[3]])[0])
    out["put"] = "accepted"
except StoreError as exc:
    out["put"] = "StoreError: " + str(exc)
report = warm_corpus(docs, engine, progress=False, context="none")
out["report"] = {"skipped": report.skipped, "encoded": report.encoded, "store_errors": report.store_errors,
                 "reasons": [r for _, r in report.failed]}
print(json.dumps(out))
"""


@pytest.mark.skipif(not hasattr(os, "setuid") or os.geteuid() != 0,
                    reason="needs root to run a subprocess as user nobody (os.setuid)")
def test_read_only_store_readers_hit_and_miss_writers_get_a_clear_error():
    base = tempfile.mkdtemp(prefix="kvb-ro-", dir="/tmp")  # pytest's tmp_path is private to root
    try:
        os.chmod(base, 0o755)
        root = os.path.join(base, "store")
        docs = make_docs(5, seed=1)
        engine = FakeEngine(store=DiskStore(root))
        for d in docs[:3]:
            key = engine.chunk_key(engine.tokenize_document(d))
            engine.store.put(key, engine.encode_batch([d])[0])
        proc = subprocess.run([PYTHON, "-c", AS_NOBODY, root, "5"], env=python_env(), capture_output=True,
                              text=True, timeout=240)
        if proc.returncode != 0 and "Permission denied" in proc.stderr and "import" in proc.stderr.lower():
            pytest.skip(f"user nobody cannot run this interpreter: {proc.stderr.strip().splitlines()[-1]}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["writable"] is False
        assert out["hits"] == 3 and out["contains"] == 3 and out["miss"] and out["texts"] == 3
        assert out["put"].startswith("StoreError: ") and "read-only for this process" in out["put"]
        report = out["report"]
        assert report["skipped"] == 3 and report["encoded"] == 0 and report["store_errors"] == 2
        assert all("read-only for this process" in r for r in report["reasons"])
        # nothing left behind: the shards and the settings file the store's first entry recorded
        assert sorted(os.listdir(root)) == sorted({k[:2] for k in DiskStore(root).keys()} | {"store.json"})
        assert len(DiskStore(root)) == 3
    finally:
        shutil.rmtree(base, ignore_errors=True)
