"""warm_corpus: sources, dedup, failures, resumability (Ctrl-C and kill -9), corruption repair,
concurrent writers, model isolation, the real engine on a disk store, and the Ray backend."""
import json
import os
import signal
import subprocess
import textwrap
import time

import pytest

from kvboost_rag.testing.store import (PYTHON, FakeEngine, make_docs, other_tiny_model_factory, python_env,
                            tiny_model_factory)
from kvboost_rag.index.sources import CorpusError, load_documents, template_render
from kvboost_rag.store.disk import DiskStore
from kvboost_rag.store.tiered import TieredStore
from kvboost_rag.errors import InvalidConfigError
from kvboost_rag.store.memory import MemoryStore
from kvboost_rag.app.warm import WarmReport, warm_corpus
from kvboost_rag.index.context import ContextConfig

# The job's mechanics (dedup, resume, kills, concurrency) are tested with one entry per document:
# context computed with the document. The default (stored neighbour KV) adds each document's
# isolated entry first; the Ray test below covers it.
COMPUTED = ContextConfig(neighbour_kv="computed")


class LCDoc:  # duck-typed LangChain Document
    def __init__(self, page_content, metadata=None):
        self.page_content = page_content
        self.metadata = metadata or {}


class LINode:  # duck-typed LlamaIndex node
    def __init__(self, text, meta):
        self.text, self.metadata, self.id_ = text, meta, "node-" + text[:5]

    def get_content(self, metadata_mode=None):
        assert str(getattr(metadata_mode, "value", metadata_mode)) == "llm"
        return "\n".join(f"{k}: {v}" for k, v in self.metadata.items()) + "\n\n" + self.text


def _flip_tensor_byte(path):
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 0xFF
    path.write_bytes(bytes(raw))


# ------------------------------------------------------------------ sources
def test_sources_and_renders(tmp_path):
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    (tmp_path / "folder" / "a.txt").write_text("folder doc a")
    (tmp_path / "folder" / "sub" / "b.md").write_text("# folder doc b")
    (tmp_path / "folder" / "skip.bin").write_bytes(b"\x00")
    (tmp_path / "folder" / "empty.txt").write_text("  \n")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"id": "x1", "text": "json doc one"}\n\n{"id": "x2", "text": ""}\nnot json\n')

    folder = load_documents(tmp_path / "folder")
    assert [(d.id, d.text, d.error) for d in folder] == [
        ("a.txt", "folder doc a", None), ("empty.txt", "", "empty document"), ("sub/b.md", "# folder doc b", None)]
    rows = load_documents(str(jsonl))
    assert [(d.id, d.error) for d in rows] == [("x1", None), ("x2", "empty document"), ("c.jsonl:4", rows[2].error)]
    assert rows[2].error.startswith("invalid JSON")

    lc = load_documents([LCDoc("lc text", {"source": "s.txt"})])
    assert lc[0].text == "lc text" and lc[0].id == "s.txt#0"
    li = load_documents([LINode("body text", {"title": "T"})])
    assert li[0].text == "title: T\n\nbody text" and li[0].id == "node-body "
    tpl = load_documents([LCDoc("x", {"source": "S"})], render=template_render("[{source}] {page_content}"))
    assert tpl[0].text == "[S] x"
    bad = load_documents([object()])
    assert "cannot get text" in bad[0].error
    with pytest.raises(CorpusError):
        load_documents("no such path, or a text?")
    with pytest.raises(CorpusError):
        load_documents(42)


def test_langchain_document_prompt_render():
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document

    from kvboost_rag.index.sources import langchain_render

    docs = load_documents([Document(page_content="hello", metadata={"source": "a"})],
                          render=langchain_render("{source}: {page_content}", document_separator="\n\n"))
    assert docs[0].text == "\n\na: hello"
    assert load_documents([Document(page_content="plain")])[0].text == "plain"


def test_llamaindex_node_default_render():
    pytest.importorskip("llama_index.core")
    from llama_index.core.schema import MetadataMode, TextNode

    node = TextNode(text="body", metadata={"title": "T", "secret": "s"}, excluded_llm_metadata_keys=["secret"])
    assert load_documents([node])[0].text == node.get_content(metadata_mode=MetadataMode.LLM)
    assert "secret" not in load_documents([node])[0].text


# ------------------------------------------------------------ local backend
def test_dedup_failures_and_report(tmp_path):
    engine = FakeEngine(store=DiskStore(tmp_path))
    docs = make_docs(10) + make_docs(3) + ["", "FAIL-ENCODE this one", "word " * 600]
    report = warm_corpus(docs, engine, batch_size=4, progress=False, context=COMPUTED)
    assert report.documents == 16 and report.encoded == 10 and report.duplicates == 3 and report.skipped == 0
    reasons = dict(report.failed)
    assert reasons["#13"] == "empty document" and "synthetic encoder failure" in reasons["#14"]
    assert "do not fit the context window (512)" in reasons["#15"]
    assert report.tokens == sum(len(d.split()) for d in make_docs(10))
    assert report.bytes_written == DiskStore(tmp_path).nbytes
    assert report.tokens_per_s > 0 and "tokens/s" in report.summary()
    assert json.dumps(report.to_dict())
    assert engine.registered == set(make_docs(10))
    assert len(DiskStore(tmp_path)) == 10


def test_batches_are_sorted_by_length():
    engine = FakeEngine()
    batches = []
    real = engine.encode_batch
    engine.encode_batch = lambda texts: batches.append([len(t.split()) for t in texts]) or real(texts)
    warm_corpus(make_docs(30, min_words=1, max_words=60), engine, batch_size=5, progress=False)
    flat = [n for b in batches for n in b]
    assert flat == sorted(flat, reverse=True) and all(len(b) <= 5 for b in batches)


def test_ctrl_c_then_resume_loses_nothing(tmp_path):
    docs = make_docs(20)
    engine = FakeEngine(store=DiskStore(tmp_path))
    calls = []

    def interrupt(rows):
        calls.append(rows)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        warm_corpus(docs, engine, batch_size=4, progress=False, on_batch=interrupt, context=COMPUTED)
    partial = info.value.report
    assert partial.interrupted and partial.encoded == 8 and len(DiskStore(tmp_path)) == 8
    engine2 = FakeEngine(store=DiskStore(tmp_path))
    report = warm_corpus(docs, engine2, batch_size=4, progress=False, context=COMPUTED)
    assert report.skipped == 8 and report.encoded == 12
    assert len(engine2.encoded_texts) == 12 and engine2.registered == set(docs)


def test_corrupt_entries_are_recomputed_by_the_next_warm(tmp_path):
    docs = make_docs(6)
    store = DiskStore(tmp_path)
    warm_corpus(docs, FakeEngine(store=store), progress=False, context=COMPUTED)
    paths = sorted(tmp_path.rglob("*.safetensors"))
    with open(paths[0], "r+b") as f:  # truncated: the header/length check in contains() sees it
        f.truncate(paths[0].stat().st_size // 2)
    _flip_tensor_byte(paths[1])       # bit flip in tensor data: only the checksum sees it
    report = warm_corpus(docs, FakeEngine(store=DiskStore(tmp_path)), progress=False, context=COMPUTED)
    assert report.encoded == 1 and report.skipped == 5
    report = warm_corpus(docs, FakeEngine(store=DiskStore(tmp_path)), progress=False, verify_existing=True,
                         context=COMPUTED)
    assert report.encoded == 1 and report.skipped == 5
    assert DiskStore(tmp_path).verify() == [] and len(DiskStore(tmp_path)) == 6


CONCURRENT = textwrap.dedent("""
    import os, sys, time
    from kvboost_rag.testing.store import FakeEngine, make_docs
    from kvboost_rag.store.disk import DiskStore
    from kvboost_rag.app.warm import warm_corpus
    from kvboost_rag.index.context import ContextConfig
    root, a, b, barrier = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    open(f"{barrier}.{a}", "w").close()          # barrier: start together, so the writes overlap
    while len([f for f in os.listdir(os.path.dirname(barrier)) if f.startswith("ready.")]) < 2:
        time.sleep(0.01)
    docs = make_docs(30)[a:b]
    r = warm_corpus(docs, FakeEngine(store=DiskStore(root), delay_s=0.05), batch_size=3, progress=False,
                    context=ContextConfig(neighbour_kv="computed"))
    print(r.encoded, r.skipped)
""")


def test_two_concurrent_warm_processes(tmp_path):
    """Two processes warm overlapping halves of a corpus into one store at the same time."""
    root, barrier = tmp_path / "store", tmp_path / "sync" / "ready"
    barrier.parent.mkdir()
    procs = [subprocess.Popen([PYTHON, "-c", CONCURRENT, str(root), a, b, str(barrier)], env=python_env(),
                              stdout=subprocess.PIPE, text=True) for a, b in (("0", "20"), ("10", "30"))]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    store = DiskStore(root)
    assert store.verify() == [], "no corrupt entry"
    assert len(store) == 30, "no lost entry"
    assert not list(root.rglob("*.tmp"))
    encoded = sum(int(o.split()[0]) for o in outs)
    assert 30 <= encoded <= 40  # the 10 shared documents may be written by both: harmless


def test_bad_arguments():
    with pytest.raises(InvalidConfigError):
        warm_corpus(["a"], FakeEngine(), backend="spark", progress=False)
    with pytest.raises(InvalidConfigError):
        warm_corpus(["a"], FakeEngine(), batch_size=0, progress=False)
    with pytest.raises(InvalidConfigError):
        warm_corpus(["a"], FakeEngine(), backend="ray", progress=False)  # a loaded engine cannot go to actors
    with pytest.raises(InvalidConfigError):
        warm_corpus(["a"], lambda: FakeEngine(), MemoryStore(), backend="ray", progress=False)


# ---------------------------------------------------------- real tiny model
KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from kvboost_rag.testing.store import make_docs, tiny_model_factory
    from kvboost_rag.store.disk import DiskStore
    from kvboost_rag.app.warm import warm_corpus
    from kvboost_rag.index.context import ContextConfig
    docs = make_docs(40) + make_docs(5)   # 40 unique documents
    warm_corpus(docs, tiny_model_factory, DiskStore(sys.argv[1]), batch_size=2, progress=False,
                on_batch=lambda rows: time.sleep(0.25), context=ContextConfig(neighbour_kv="computed"))
""")


def test_kill_9_mid_run_then_resume(tmp_path):
    root = tmp_path / "store"
    proc = subprocess.Popen([PYTHON, "-c", KILL_SCRIPT, str(root)], env=python_env())
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None and len(DiskStore(root)) < 6:
            time.sleep(0.05)
        assert proc.poll() is None, "warm job finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    before = len(DiskStore(root))
    assert 6 <= before < 40
    report = warm_corpus(make_docs(40) + make_docs(5), tiny_model_factory, DiskStore(root), batch_size=8,
                         progress=False, context=COMPUTED)
    assert report.skipped == before and report.encoded == 40 - before, report.summary()
    assert report.duplicates == 5 and report.failed == []
    store = DiskStore(root)
    assert len(store) == 40 and store.verify() == []
    from kvboost_rag.app.cli import main

    assert main(["inspect", "--store", str(root), "--verify"]) == 0


def test_real_engine_disk_store_fresh_process_reuse(tmp_path):
    """Warm with the real engine, then a *new* engine on the same directory finds the documents in
    a flat prompt (texts rebuilt from headers) and reuses their stored KV; another model does not."""
    from kvboost_rag.engine import KVBoostEngine

    model, tok = tiny_model_factory()
    store = TieredStore(MemoryStore(), DiskStore(tmp_path, kv_bits=8))
    engine = KVBoostEngine(model, tok, store=store)
    docs = make_docs(4)
    report = engine.warm(docs)  # delegates to warm_corpus
    assert isinstance(report, WarmReport) and report.encoded == 4

    fresh = KVBoostEngine(model, tok, store=DiskStore(tmp_path))
    prompt = "Context:\n" + docs[2] + "\n" + docs[0] + "\nQuestion: which documents?"
    result = fresh.generate(prompt, max_new_tokens=3)
    assert result.reused_tokens + result.recomputed_tokens >= len(fresh.tokenize_document(docs[2])), result.to_dict()

    other_model, other_tok = other_tiny_model_factory()
    other = KVBoostEngine(other_model, other_tok, store=DiskStore(tmp_path))
    assert other.fingerprint != engine.fingerprint
    assert not any(True for _ in other.store.texts(other.fingerprint))
    key = engine.chunk_key(engine.tokenize_document(docs[0]))
    assert DiskStore(tmp_path).get(key, other.fingerprint) is None
    assert not other.is_warm(docs[0])
    again = warm_corpus(docs, other, progress=False, context=COMPUTED)
    assert again.encoded == 4 and again.skipped == 0
    assert len(DiskStore(tmp_path)) == 8


# --------------------------------------------------------------------- ray
def test_ray_backend_two_actors(tmp_path):
    ray = pytest.importorskip("ray")
    here = os.path.dirname(os.path.abspath(__file__))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([here, os.path.dirname(here)]),
                                       "OMP_NUM_THREADS": "1"}})
    try:
        docs = make_docs(12) + make_docs(2) + [""]
        report = warm_corpus(docs, tiny_model_factory, DiskStore(tmp_path), backend="ray", num_actors=2,
                             batch_size=3, progress=False)
    finally:
        ray.shutdown()
    # the default context (stored neighbour KV): an isolated pass, then the context pass
    assert report.backend == "ray" and report.encoded == 12 and report.isolated_encoded == 12, report.summary()
    assert report.encoding == "context" and report.context_encoded == 12
    assert report.duplicates == 2 and len(report.failed) == 1
    store = DiskStore(tmp_path)
    assert len(store) == 24 and store.verify() == []
    assert sorted(e.encoding for e in store.entries()) == ["context"] * 12 + ["isolated"] * 12
    again = warm_corpus(make_docs(12), tiny_model_factory, store, progress=False)
    assert again.skipped == 12 and again.encoded == 0
