"""A long-lived engine never answers from a stale view of its store: every document segment of a
prompt (detected or explicit) is looked up against the live store, and detection inside flat
prompts sees documents warmed by another process since the last look."""
from __future__ import annotations

import time

import pytest

from kvboost_rag import KVBoostEngine, Segment
from kvboost_rag.store.disk import DiskStore
from kvboost_rag.store.tiered import TieredStore
from kvboost_rag.store.memory import MemoryStore
from kvboost_rag.testing.models import DOCS, tiny_engine

QUESTION = "\nQuestion: where is the Colosseum?\nAnswer:"


def _flat(a: str, b: str) -> str:
    return "Context:\n" + a + "\n" + b + QUESTION


def _explicit(a: str, b: str):
    return [Segment.text("Context:\n"), Segment.document(a), Segment.text("\n"), Segment.document(b),
            Segment.text(QUESTION)]


@pytest.fixture(params=["disk", "tiered"])
def pair(request, tmp_path):
    """(long-lived engine A, a second engine B on the same directory: "another process")."""
    store = DiskStore(tmp_path) if request.param == "disk" else TieredStore(MemoryStore(), DiskStore(tmp_path))
    a = tiny_engine("llama", store=store, write_behind=False)
    b = KVBoostEngine(a.model, a.tokenizer, store=DiskStore(tmp_path), write_behind=False)
    return a, b


@pytest.mark.parametrize("form", ["flat", "explicit"])
def test_document_warmed_elsewhere_is_reused_next_to_a_known_one(pair, form):
    a, b = pair
    a.warm([DOCS[0]])
    prompt = _flat(DOCS[0], DOCS[2]) if form == "flat" else _explicit(DOCS[0], DOCS[2])
    before = a.generate(prompt, max_new_tokens=1)
    assert before.extra["documents_reused"] == 1
    b.warm([DOCS[2]])  # another engine object / process on the same directory
    time.sleep(a._store_watch.interval_s)  # the watch looks at most once per interval (0.1 s)
    after = a.generate(prompt, max_new_tokens=1)
    assert after.extra["documents"] == 2
    assert after.extra["documents_reused"] == 2


def test_memory_tier_does_not_hide_a_new_disk_entry(tmp_path):
    a = tiny_engine("llama", store=TieredStore(MemoryStore(), DiskStore(tmp_path)), write_behind=False)
    b = KVBoostEngine(a.model, a.tokenizer, store=DiskStore(tmp_path), write_behind=False)
    prompt = _explicit(DOCS[1], DOCS[3])
    assert a.generate(prompt, max_new_tokens=1).extra["documents_reused"] == 0
    b.warm([DOCS[1], DOCS[3]])
    assert a.generate(prompt, max_new_tokens=1).extra["documents_reused"] == 2


WARM_IN_ANOTHER_PROCESS = """
import sys
from kvboost_rag.store.disk import DiskStore
from kvboost_rag.testing.models import DOCS, tiny_engine
tiny_engine("llama", store=DiskStore(sys.argv[1]), write_behind=False).warm([DOCS[int(sys.argv[2])]])
"""


def test_document_warmed_by_another_process_is_reused_next_to_a_known_one(tmp_path):
    import subprocess

    from kvboost_rag.testing.store import PYTHON, python_env

    a = tiny_engine("llama", store=TieredStore(MemoryStore(), DiskStore(tmp_path)), write_behind=False)
    a.warm([DOCS[1]])
    flat = _flat(DOCS[1], DOCS[3])
    assert a.generate(flat, max_new_tokens=1).extra["documents_reused"] == 1
    subprocess.run([PYTHON, "-c", WARM_IN_ANOTHER_PROCESS, str(tmp_path), "3"], env=python_env(), check=True,
                   timeout=240)
    time.sleep(a._store_watch.interval_s)
    r = a.generate(flat, max_new_tokens=1)
    assert (r.extra["documents"], r.extra["documents_reused"]) == (2, 2)


def test_a_rescan_reads_only_new_entries_in_changed_folders(tmp_path, monkeypatch):
    from kvboost_rag.store import safe_files
    from kvboost_rag.store import disk as disk_module

    a = tiny_engine("llama", store=DiskStore(tmp_path), write_behind=False)
    b = KVBoostEngine(a.model, a.tokenizer, store=DiskStore(tmp_path), write_behind=False)
    b.warm(DOCS[:3])
    a._store_watch.interval_s = 0.0
    a.generate("Q: " + DOCS[0], max_new_tokens=1)  # sees the three entries
    reads = []
    real = safe_files._read_entry

    def counting(path, *, whole):
        if not whole:
            reads.append(path.name)  # a header read (texts), not a get
        return real(path, whole=whole)

    monkeypatch.setattr(disk_module, "_read_entry", counting)
    b.warm([DOCS[3]])
    r = a.generate("Q: " + DOCS[0] + "\n" + DOCS[3], max_new_tokens=1)
    assert r.extra["documents_reused"] == 2
    assert reads == [a.key_for_text(DOCS[3]) + ".safetensors"]  # headers read: the new entry's only


def test_engine_start_up_reads_entry_headers_only(tmp_path, monkeypatch):
    from kvboost_rag.store import disk as disk_module
    from kvboost_rag.store import safe_files

    writer = tiny_engine("llama", store=DiskStore(tmp_path), write_behind=False)
    writer.warm(DOCS)
    reads = []
    real = safe_files._read_entry

    def counting(path, *, whole):
        reads.append(whole)
        return real(path, whole=whole)

    monkeypatch.setattr(disk_module, "_read_entry", counting)
    fresh = KVBoostEngine(writer.model, writer.tokenizer, store=TieredStore(MemoryStore(), DiskStore(tmp_path)),
                          write_behind=False)
    assert reads == [False] * len(DOCS)  # one header per entry (its text, for detection), no tensors
    assert len(fresh.detector) == len(DOCS)
    reads.clear()
    time.sleep(fresh._store_watch.interval_s)
    fresh.generate("Q: " + DOCS[1], max_new_tokens=1)
    assert reads.count(False) == 0  # nothing changed: the store watch read no header again
