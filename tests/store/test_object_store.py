"""The object-store tier (kvboost_rag.store.object_store / object_cache) against a real S3 API:
moto's server on a free 127.0.0.1 port, the standard AWS_* variables pointing at it.

The store contract (byte-identical to disk entries, verified reads, foreign objects never
deleted, budget), the shared store across engines and processes (warm once, every replica reuses
100% of the documents with the answers of a local-disk store), and outages: a stopped, hung or
throttling endpoint gives misses and per-write errors in bounded time, never a hang, and the
store works again once the server is back."""
from __future__ import annotations

import http.client
import http.server
import json
import os
import pickle
import socket
import subprocess
import textwrap
import threading
import time
import uuid

import pytest
import torch

pytest.importorskip("obstore")
moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from kvboost_rag.errors import InvalidConfigError, StoreError  # noqa: E402
from kvboost_rag.store.disk import DiskStore  # noqa: E402
from kvboost_rag.store.entry_format import FORMAT  # noqa: E402
from kvboost_rag.store.object_cache import ObjectTieredStore, open_object_store  # noqa: E402
from kvboost_rag.store.object_store import GENERATION_OBJECT, ObjectStore, is_store_url  # noqa: E402
from kvboost_rag.store.tiered import TieredStore, open_store  # noqa: E402
from kvboost_rag.testing.store import (PYTHON, make_docs, python_env, synthetic_chunk,  # noqa: E402
                                       tiny_model_factory)

FAST = dict(connect_timeout_s=1.0, timeout_s=3.0, retries=2, retry_budget_s=3.0, cooldown_s=0.5, put_attempts=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3:
    """A moto server on 127.0.0.1 that a test can stop and restart on the same port (moto keeps its
    buckets in the process, so they survive a restart), and one fresh bucket."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.server = None
        self.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.bucket = f"kvb-{uuid.uuid4().hex[:12]}"
        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                   aws_access_key_id="testing", aws_secret_access_key="testing")
        self.client.create_bucket(Bucket=self.bucket)

    def start(self) -> None:
        self.server = moto_server.ThreadedMotoServer("127.0.0.1", self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def url(self, prefix: str = "kv") -> str:
        return f"s3://{self.bucket}/{prefix}"

    def put_raw(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def raw(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def names(self, prefix: str = "kv/") -> set:
        out = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix).get("Contents", [])
        return {o["Key"] for o in out}


def _aws_env(endpoint: str) -> dict:
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint}


@pytest.fixture
def s3(monkeypatch, tmp_path):
    server = S3()
    for name, value in _aws_env(server.endpoint).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KVBOOST_RAG_HOME", str(tmp_path / "home"))  # default local caches go here
    try:
        yield server
    finally:
        try:
            server.stop()
        except Exception:
            pass


def _key(i: int) -> str:
    return f"{i:02d}" + "ab" * 31


def _same(a, b) -> bool:
    return (torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) and a.token_ids == b.token_ids
            and a.fingerprint == b.fingerprint and a.text == b.text and a.start == b.start)


# ------------------------------------------------------------------- contract
def test_round_trip_is_byte_identical_to_the_disk_format(s3, tmp_path):
    store = ObjectStore(s3.url(), kv_bits=16, **FAST)
    chunk = synthetic_chunk(16, "fp-a", seed=1)
    size = store.put(_key(1), chunk)
    assert size > 0 and store.contains(_key(1), "fp-a")
    assert not store.contains(_key(1), "fp-b") and store.get(_key(1), "fp-b") is None  # other model: a miss
    assert store.get(_key(2), "fp-a") is None and not store.contains(_key(2), "fp-a")
    assert _same(store.get(_key(1), "fp-a"), chunk)

    # the object, copied to a disk store's place, is served by DiskStore, and a disk file by the object store
    disk = DiskStore(tmp_path / "disk", kv_bits=16)
    obj = s3.raw(f"kv/{_key(1)[:2]}/{_key(1)}.safetensors")
    path = disk.path_for(_key(1))
    path.parent.mkdir(parents=True)
    path.write_bytes(obj)
    assert _same(disk.get(_key(1), "fp-a"), chunk)
    other = synthetic_chunk(9, "fp-a", seed=2)
    disk.put(_key(3), other)
    s3.put_raw(f"kv/{_key(3)[:2]}/{_key(3)}.safetensors", disk.path_for(_key(3)).read_bytes())
    assert _same(store.get(_key(3), "fp-a"), other)

    # a replica's local cache holds the object's own bytes
    tiers = open_store(s3.url(), cache_dir=tmp_path / "cache", **FAST)
    assert isinstance(tiers, ObjectTieredStore) and isinstance(tiers, TieredStore)
    assert _same(tiers.get(_key(1), "fp-a"), chunk)
    tiers.flush()
    assert tiers.disk.path_for(_key(1)).read_bytes() == obj
    assert sorted(store.keys()) == [_key(1), _key(3)] and len(store) == 2
    assert dict(store.texts("fp-a")) == {_key(1): "doc", _key(3): "doc"}
    assert store.verify() == []
    assert {e.key for e in store.entries()} == {_key(1), _key(3)}

    q = ObjectStore(s3.url("q8"), kv_bits=8, **FAST)
    q.put(_key(4), chunk)
    assert _same(q.get(_key(4), "fp-a"), q.as_stored(chunk))


def test_damaged_and_foreign_objects_are_misses_and_only_the_stores_own_are_deleted(s3):
    store = ObjectStore(s3.url(), **FAST)
    for i in range(3):
        store.put(_key(i), synthetic_chunk(12, "fp", seed=i))
    good = s3.raw(f"kv/{_key(0)[:2]}/{_key(0)}.safetensors")
    from safetensors.torch import save

    at = lambda i: f"kv/{_key(i)[:2]}/{_key(i)}.safetensors"  # noqa: E731
    s3.put_raw(at(1), good[:-40])                                   # truncated (our header intact)
    flipped = bytearray(s3.raw(at(2)))
    flipped[-3] ^= 0xFF
    s3.put_raw(at(2), bytes(flipped))                               # a bit flip: checksum fails
    s3.put_raw(at(5), b"not an entry at all" * 10)                  # foreign bytes under an entry name
    s3.put_raw(at(6), save({"x": torch.zeros(3)}, metadata={"format": "someone-else/1"}))  # foreign safetensors
    s3.put_raw("kv/notes.txt", b"hello")                            # not named like an entry
    s3.put_raw("kv/ab/zz.bin", b"hello")
    foreign = {at(5), at(6), "kv/notes.txt", "kv/ab/zz.bin"}

    bad = dict(store.verify())
    assert set(bad) == {_key(1), _key(2), _key(5), _key(6)}, bad
    for i in (1, 2, 5, 6):
        assert store.get(_key(i), "fp") is None and not store.contains(_key(i), "fp")
    assert store.corrupt >= 4
    assert foreign <= s3.names()        # misses, never deleted
    assert at(1) not in s3.names() and at(2) not in s3.names()  # the store's own damaged entries are removed
    s3.put_raw(at(1), good[:-40])
    bad = dict(store.verify(remove=True))
    assert "left in place" in bad[_key(5)] and "left in place" in bad[_key(6)]
    assert at(1) not in s3.names() and foreign <= s3.names()
    assert store.get(_key(0), "fp") is not None
    store.clear()
    assert s3.names() - {f"kv/{GENERATION_OBJECT}"} == foreign


def test_budget_evicts_the_oldest_entries_and_never_a_foreign_object(s3):
    chunk = synthetic_chunk(32, "fp")
    probe = ObjectStore(s3.url("probe"), **FAST)
    size = probe.put(_key(0), chunk)
    store = ObjectStore(s3.url(), max_bytes=int(2.5 * size), **FAST)
    s3.put_raw(f"kv/{_key(9)[:2]}/{_key(9)}.safetensors", b"x" * size)  # foreign, counted, never evicted
    for i in range(1, 4):
        store.put(_key(i), chunk)
        time.sleep(1.05)  # S3 times are in whole seconds: keep the ages distinct
    keys = set(store.keys())
    assert _key(9) in keys and _key(3) in keys and _key(1) not in keys, keys
    assert store.evictions >= 1


def test_two_stores_on_one_bucket_see_each_others_entries_and_generation(s3, tmp_path):
    a = open_store(s3.url(), cache_dir=tmp_path / "a", **FAST)
    b = open_store(s3.url(), cache_dir=tmp_path / "b", **FAST)
    g0 = b.generation()
    a.put(_key(1), synthetic_chunk(8, "fp", text="first document"))
    g1 = b.generation()
    assert g1 != g0
    assert b.contains(_key(1), "fp") and dict(b.texts("fp")) == {_key(1): "first document"}
    assert b.get(_key(1), "fp") is not None
    b.flush()
    assert b.disk.contains(_key(1), "fp")  # now in b's local cache
    b.put(_key(2), synthetic_chunk(8, "fp", text="second"))
    assert a.generation() != g1 and dict(a.texts("fp")) == {_key(1): "first document", _key(2): "second"}
    assert len(a) == 2 and a.verify() == []


def test_routing_specs_and_pickling(s3, tmp_path):
    from kvboost_rag.app.warm import _open_spec, _store_spec

    assert is_store_url("s3://b/p") and is_store_url("gs://b/p") and not is_store_url(str(tmp_path))
    assert not is_store_url("file:///tmp/x") and not is_store_url(None)
    with pytest.raises(InvalidConfigError):
        open_store(str(tmp_path / "d"), cache_dir=str(tmp_path))  # object options on a directory
    with pytest.raises(InvalidConfigError):
        ObjectStore(str(tmp_path))
    with pytest.raises(InvalidConfigError):
        open_store("nosuchscheme://x/y")
    store = open_store(s3.url(), cache_dir=tmp_path / "c", cache_bytes=1 << 20, memory_bytes=1 << 20, **FAST)
    spec = _store_spec(store)
    reopened = _open_spec(pickle.loads(pickle.dumps(spec)))
    assert isinstance(reopened, ObjectTieredStore) and reopened.url == store.url
    assert reopened.disk.root == store.disk.root and reopened.disk.max_bytes == 1 << 20
    assert _store_spec(s3.url())["object"]["url"] == s3.url()
    remote = pickle.loads(pickle.dumps(store.remote))
    store.put(_key(1), synthetic_chunk(8, "fp"))
    assert remote.get(_key(1), "fp") is not None


def test_cli_inspect_and_verify_an_object_store(s3, tmp_path, capsys):
    from kvboost_rag.app.cli import main

    store = ObjectStore(s3.url(), **FAST)
    store.put(_key(1), synthetic_chunk(8, "fp"))
    assert main(["inspect", "--store", s3.url(), "--verify", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["store"] == s3.url() and summary["entries"] == 1 and summary["corrupt"] == []
    s3.put_raw(f"kv/{_key(2)[:2]}/{_key(2)}.safetensors", b"junk")
    assert main(["inspect", "--store", s3.url(), "--verify", "--repair"]) == 1
    assert f"kv/{_key(2)[:2]}/{_key(2)}.safetensors" in s3.names()  # foreign: left in place


# ------------------------------------------------------- engines and processes
def _prompt(docs):
    from kvboost_rag.prompt.segments import Segment

    return [Segment.document(d) for d in docs] + [Segment.text("\nQuestion: which documents are these?")]


def _answer(engine, docs):
    r = engine.generate(_prompt(docs), max_new_tokens=8, temperature=0.0)
    return r.text, r.extra["documents_reused"], r.extra["documents"]


def test_warm_into_s3_then_another_engine_reuses_every_document_like_a_disk_store(s3, tmp_path):
    from kvboost_rag.app.warm import warm_corpus
    from kvboost_rag.engine import KVBoostEngine

    docs = make_docs(6, seed=3)
    model, tok = tiny_model_factory()
    report = warm_corpus(docs, KVBoostEngine(model, tok, store=open_store(s3.url(), cache_dir=tmp_path / "w")),
                         s3.url(), context="none", progress=False)
    assert report.encoded == 6 and not report.failed, report.summary()

    replica = KVBoostEngine(model, tok, store=open_store(s3.url(), cache_dir=tmp_path / "r"))
    local = KVBoostEngine(model, tok, store=open_store(str(tmp_path / "disk")))
    local.warm(docs)
    for chosen in (docs[:4], [docs[5], docs[1], docs[3]]):
        text, reused, total = _answer(replica, chosen)
        assert reused == total == len(chosen)
        assert text == _answer(local, chosen)[0]
    replica.store.flush()
    assert replica.store.remote.hits == 5 and len(replica.store.disk) == 5  # each document fetched once
    # a flat prompt: detection knows the documents from the object store's headers
    flat = replica.generate("Context:\n" + docs[2] + "\nQuestion: what?", max_new_tokens=2)
    assert flat.extra["documents_reused"] == 1
    again = warm_corpus(docs, replica, s3.url(), context="none", progress=False)
    assert again.skipped == 6 and again.encoded == 0


QUERY = textwrap.dedent("""
    import json, sys
    from kvboost_rag.engine import KVBoostEngine
    from kvboost_rag.prompt.segments import Segment
    from kvboost_rag.store.tiered import open_store
    from kvboost_rag.testing.store import make_docs, tiny_model_factory
    model, tok = tiny_model_factory()
    engine = KVBoostEngine(model, tok, store=open_store(sys.argv[1], cache_dir=sys.argv[2]))
    docs = make_docs(5, seed=4)
    r = engine.generate([Segment.document(d) for d in docs[:4]] + [Segment.text("\\nQuestion: which documents are these?")],
                        max_new_tokens=8, temperature=0.0)
    print(json.dumps({"text": r.text, "reused": r.extra["documents_reused"], "docs": r.extra["documents"],
                      "remote_hits": engine.store.remote.hits}))
""")


def test_two_query_processes_reuse_the_same_entries(s3, tmp_path):
    from kvboost_rag.engine import KVBoostEngine

    docs = make_docs(5, seed=4)
    model, tok = tiny_model_factory()
    writer = KVBoostEngine(model, tok, store=open_store(s3.url(), cache_dir=tmp_path / "w"))
    writer.warm(docs)
    env = {**python_env(), **_aws_env(s3.endpoint), "KVBOOST_RAG_HOME": str(tmp_path / "home")}
    procs = [subprocess.Popen([PYTHON, "-c", QUERY, s3.url(), str(tmp_path / f"replica{i}")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    local = KVBoostEngine(model, tok, store=open_store(str(tmp_path / "disk")))
    local.warm(docs)
    expected = _answer(local, docs[:4])[0]
    for o in outs:
        assert o["reused"] == o["docs"] == 4 and o["remote_hits"] == 4 and o["text"] == expected, o


def test_a_long_lived_engine_sees_documents_another_machine_warmed(s3, tmp_path):
    from kvboost_rag.engine import KVBoostEngine

    model, tok = tiny_model_factory()
    reader = KVBoostEngine(model, tok, store=open_store(s3.url(), cache_dir=tmp_path / "r"))
    writer = KVBoostEngine(model, tok, store=open_store(s3.url(), cache_dir=tmp_path / "w"))
    doc = make_docs(1, seed=7)[0]
    prompt = "Context:\n" + doc + "\nQuestion: what?"
    assert reader.generate(prompt, max_new_tokens=1).extra["documents_reused"] == 0
    writer.warm([doc])
    time.sleep(reader._store_watch.interval_s + 0.1)
    assert reader.generate(prompt, max_new_tokens=1).extra["documents_reused"] == 1


# ------------------------------------------------------------------- outages
def test_server_stopped_mid_way_gives_misses_and_failures_then_works_again(s3, tmp_path):
    from kvboost_rag.app.warm import warm_corpus
    from kvboost_rag.engine import KVBoostEngine

    docs = make_docs(6, seed=5)
    model, tok = tiny_model_factory()
    engine = KVBoostEngine(model, tok, store=open_store(s3.url(), cache_dir=tmp_path / "w", **FAST))
    assert warm_corpus(docs[:3], engine, context="none", progress=False).encoded == 3
    fresh = open_store(s3.url(), cache_dir=tmp_path / "r", **FAST)  # nothing cached locally
    keys = [engine.chunk_key(engine.tokenize_document(d)) for d in docs[:3]]
    s3.stop()

    t0 = time.monotonic()
    assert fresh.get(keys[0], engine.fingerprint) is None                 # a miss, not an exception
    assert all(fresh.get(k, engine.fingerprint) is None for k in keys)   # cooling down: no wait each time
    assert not fresh.contains(keys[1], engine.fingerprint)
    g = fresh.generation()
    assert fresh.generation() == g
    assert time.monotonic() - t0 < 15
    assert fresh.remote.unavailable >= 1
    replica = KVBoostEngine(model, tok, store=fresh)
    text, reused, _ = _answer(replica, docs[:3])   # answered by a full prefill, no crash
    assert reused == 0 and isinstance(text, str)

    t0 = time.monotonic()
    report = warm_corpus(docs[3:], engine, context="none", progress=False)  # each write fails, the job goes on
    assert time.monotonic() - t0 < 60
    assert len(report.failed) == 3 and report.encoded == 0, report.summary()
    assert all("object store write" in reason for _, reason in report.failed), report.failed

    s3.start()
    time.sleep(FAST["cooldown_s"] + 0.1)
    assert all(fresh.get(k, engine.fingerprint) is not None for k in keys)
    again = warm_corpus(docs, engine, context="none", progress=False)
    assert again.skipped == 3 and again.encoded == 3 and not again.failed
    assert ObjectStore(s3.url(), **FAST).verify() == [] and len(fresh) == 6


def test_a_hung_endpoint_times_out(monkeypatch, tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # accepts connections (kernel backlog) and never answers
    try:
        for name, value in _aws_env(f"http://127.0.0.1:{listener.getsockname()[1]}").items():
            monkeypatch.setenv(name, value)
        store = ObjectStore("s3://hung/kv", **{**FAST, "timeout_s": 1.0, "retry_budget_s": 2.0, "put_attempts": 1})
        t0 = time.monotonic()
        assert store.get(_key(1), "fp") is None
        assert time.monotonic() - t0 < 10
        t0 = time.monotonic()
        with pytest.raises(StoreError):
            store.put(_key(1), synthetic_chunk(4, "fp"))
        assert time.monotonic() - t0 < 10
    finally:
        listener.close()


class _Throttle(http.server.ThreadingHTTPServer):
    """Answers 503 SlowDown to the first ``fail`` requests, then forwards to ``upstream``."""

    def __init__(self, upstream_port: int, fail: int) -> None:
        self.upstream_port, self.fail, self.seen = upstream_port, fail, 0
        super().__init__(("127.0.0.1", 0), _ThrottleHandler)


class _ThrottleHandler(http.server.BaseHTTPRequestHandler):
    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen += 1
        if self.server.seen <= self.server.fail:
            msg = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=10)
        conn.request(self.command, self.path, body=body, headers=dict(self.headers))
        r = conn.getresponse()
        data = r.read()
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", r.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _handle

    def log_message(self, *args) -> None:
        pass


def test_throttling_is_retried_with_backoff_then_a_miss_or_an_error(s3, monkeypatch):
    chunk = synthetic_chunk(8, "fp")
    for fail, works in ((2, True), (10 ** 6, False)):
        proxy = _Throttle(s3.port, fail)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        try:
            monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
            store = ObjectStore(s3.url(f"t{fail}"), kv_bits=16, **FAST)
            t0 = time.monotonic()
            if works:
                store.put(_key(1), chunk)  # two 503s, retried
                assert _same(store.get(_key(1), "fp"), chunk) and proxy.seen > 2
            else:
                assert store.get(_key(1), "fp") is None
                with pytest.raises(StoreError):
                    store.put(_key(1), chunk)
            assert time.monotonic() - t0 < 20
        finally:
            proxy.shutdown()
            proxy.server_close()


# ----------------------------------------------------------------------- ray
def test_ray_backend_two_actors_into_s3(s3, tmp_path):
    ray = pytest.importorskip("ray")
    from kvboost_rag.app.warm import warm_corpus

    here = os.path.dirname(os.path.abspath(__file__))
    tests = os.path.dirname(here)
    env = {**_aws_env(s3.endpoint), "KVBOOST_RAG_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([tests, os.path.dirname(tests)])}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        docs = make_docs(8, seed=6)
        report = warm_corpus(docs, tiny_model_factory, s3.url(), backend="ray", num_actors=2, batch_size=2,
                             progress=False, context="none")
    finally:
        ray.shutdown()
    assert report.backend == "ray" and report.encoded == 8 and not report.failed, report.summary()
    store = ObjectStore(s3.url(), **FAST)
    assert len(store) == 8 and store.verify() == []
    again = warm_corpus(docs, tiny_model_factory, open_object_store(s3.url(), cache_dir=tmp_path / "c"),
                        context="none", progress=False)
    assert again.skipped == 8 and again.encoded == 0
    assert FORMAT.startswith("kvboost-rag")
