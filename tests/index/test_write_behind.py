"""Write-behind of missing documents, the nothing-reused warning, and a store that changes under
a running engine (issue 12). Tiny random models: the answers are gibberish, the counters are real."""
from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from kvboost_rag import DiskStore, KVBoostEngine, MemoryStore, Segment
from kvboost_rag.store.watch import StoreWatch
from kvboost_rag.index.write_behind import recognise_documents

from kvboost_rag.testing.models import DOCS, tiny_engine

# Documents of several hundred characters (blocks of any length are recognised in flat prompts).
LONG = [f"Note {i}. " + " ".join(DOCS[(i + k) % len(DOCS)] for k in range(3)) for i in range(8)]


def explicit(docs, question="Question: where is the Colosseum?\nAnswer:"):
    parts = [Segment.text("Context:\n")]
    for d in docs:
        parts += [Segment.document(d), Segment.text("\n")]
    return parts + [Segment.text(question)]


def retrieval_qa(docs, question="where is the Colosseum?"):
    """LangChain's RetrievalQA / stuff-chain layout: instruction, docs joined by a blank line, question."""
    return ("Use the following pieces of context to answer the question at the end.\n\n"
            + "\n\n".join(docs) + f"\n\nQuestion: {question}\nHelpful Answer:")


def llama_index_qa(docs, question="where is the Colosseum?"):
    """LlamaIndex's default text-QA template."""
    return ("Context information is below.\n---------------------\n" + "\n\n".join(docs)
            + "\n---------------------\nGiven the context information and not prior knowledge, answer the query.\n"
            f"Query: {question}\nAnswer: ")


@pytest.fixture
def engine():
    e = tiny_engine("llama")
    yield e
    assert e.flush_write_behind(timeout=60)


# ---------------------------------------------------------------- write-behind
def test_explicit_documents_are_stored_after_the_answer_and_reused_next(engine):
    prompt = explicit([DOCS[0], DOCS[2]])
    first = engine.generate(prompt, max_new_tokens=4)
    assert first.reused_tokens == 0 and first.extra["documents_reused"] == 0
    assert engine.flush_write_behind(timeout=60)
    stats = engine.write_behind.stats()
    assert stats["queued"] == 2 and stats["written"] == 2 and stats["dropped"] == 0 and stats["pending"] == 0
    assert engine.is_warm(DOCS[0]) and engine.is_warm(DOCS[2])
    # the entry is exactly what warm would have made: same key, same KV
    stored = engine.store.get(engine.key_for_text(DOCS[0]), engine.fingerprint)
    warmed = engine.encode_batch([DOCS[0]])[0]
    assert stored.token_ids == warmed.token_ids and (stored.keys - warmed.keys).abs().max() < 1e-5
    second = engine.generate(explicit([DOCS[2], DOCS[0]]), max_new_tokens=4)
    assert second.reused_tokens > 0 and second.extra["documents_reused"] == 2
    engine.generate(prompt, max_new_tokens=2)
    assert engine.flush_write_behind(timeout=60)
    assert engine.write_behind.stats()["queued"] == 2  # everything reused: nothing queued again


@pytest.mark.parametrize("layout", [retrieval_qa, llama_index_qa])
def test_documents_pasted_into_a_flat_prompt_are_recognised_stored_and_detected_next(engine, layout):
    first = engine.generate(layout([LONG[0], LONG[1]]), max_new_tokens=4)
    assert first.reused_tokens == 0 and first.extra["documents"] == 0
    assert engine.flush_write_behind(timeout=60)
    assert engine.write_behind.stats()["written"] == 2
    second = engine.generate(layout([LONG[1], LONG[0]], "what is in Berlin?"), max_new_tokens=4)
    assert second.extra["documents_reused"] == 2 and second.reused_tokens > 0


def test_answer_is_the_same_with_write_behind_on_and_off(engine):
    off = KVBoostEngine(engine.model, engine.tokenizer, store=MemoryStore(), write_behind=False)
    assert off.config.write_behind is False and engine.config.write_behind is True
    # flat first: LONG holds DOCS verbatim, so once DOCS are stored they would be detected in it
    for prompt in (retrieval_qa([LONG[2], LONG[3]]), explicit([DOCS[1], DOCS[3]])):
        a = engine.generate(prompt, max_new_tokens=8)
        # the two engines share one model but not a lock: no forward of the worker alongside
        assert engine.flush_write_behind(timeout=60)
        b = off.generate(prompt, max_new_tokens=8)
        assert a.token_ids == b.token_ids and a.fresh_tokens == b.fresh_tokens == a.prompt_tokens
    assert engine.flush_write_behind(timeout=60) and engine.write_behind.stats()["written"] == 4
    # switched off: nothing queued, nothing written
    assert off.flush_write_behind(timeout=1)
    assert len(off.store) == 0 and off.write_behind.stats()["queued"] == 0
    assert off.generate(explicit([DOCS[1], DOCS[3]]), max_new_tokens=2).reused_tokens == 0


def test_encoding_happens_after_the_first_token_and_off_the_callers_thread(engine, monkeypatch):
    events = []
    original = engine.encode_batch

    def recording_encode(texts):
        events.append(("encode", threading.current_thread()))
        return original(texts)

    monkeypatch.setattr(engine, "encode_batch", recording_encode)
    stream = engine.stream(explicit([DOCS[1]]), max_new_tokens=6)
    for _ in stream:
        events.append(("token", threading.current_thread()))
    assert stream.result is not None
    events.append(("result", threading.current_thread()))
    assert engine.flush_write_behind(timeout=60)
    kinds = [k for k, _ in events]
    assert "encode" in kinds
    first_out = kinds.index("token") if "token" in kinds else kinds.index("result")
    assert kinds.index("encode") > first_out
    assert all(t is not threading.main_thread() for k, t in events if k == "encode")
    assert engine.write_behind.stats()["written"] == 1


def test_queue_bound_drops_and_counts(engine, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    original = engine.encode_batch

    def blocked_encode(texts):
        entered.set()
        assert release.wait(60)
        return original(texts)

    monkeypatch.setattr(engine, "encode_batch", blocked_encode)
    engine.write_behind.max_queue = 2
    engine.generate(explicit([LONG[0]]), max_new_tokens=1)
    assert entered.wait(60)  # the worker holds LONG[0]: the queue is empty again
    engine.generate(explicit(LONG[1:6]), max_new_tokens=1)
    stats = engine.write_behind.stats()
    assert stats["queued"] == 3 and stats["dropped"] == 3 and stats["pending"] == 3
    release.set()
    assert engine.flush_write_behind(timeout=60)
    assert engine.write_behind.stats()["written"] == 3 and len(engine.store) == 3


def test_no_deadlock_with_two_threads_while_the_worker_writes(engine):
    engine.write_behind.idle_wait_s = 0.0  # the worker interleaves with the requests
    errors, results = [], []

    def client(offset):
        try:
            for i in range(3):
                docs = [f"Thread {offset} document {i}. " + DOCS[(offset + i) % 4], DOCS[(offset + i + 1) % 4]]
                results.append(engine.generate(explicit(docs), max_new_tokens=3))
                results.append(engine.generate(retrieval_qa([LONG[offset * 3 + i]]), max_new_tokens=2))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert not errors and len(results) == 12
    assert engine.flush_write_behind(timeout=120)
    stats = engine.write_behind.stats()
    assert stats["written"] > 0 and stats["failed"] == 0
    assert engine.generate(explicit([DOCS[0], DOCS[1]]), max_new_tokens=1).extra["documents_reused"] == 2


# ---------------------------------------------------------------- warning
def test_warns_once_when_prompts_keep_reusing_nothing(caplog):
    e = tiny_engine("llama", write_behind=False)
    with caplog.at_level(logging.WARNING, logger="kvboost_rag"):
        for i in range(5):
            e.generate(explicit([DOCS[i % 4]]), max_new_tokens=1)
    warnings = [r for r in caplog.records if r.name == "kvboost_rag" and "reused no stored KV" in r.getMessage()]
    assert len(warnings) == 1
    assert "warm" in warnings[0].getMessage() and "Segment.document" in warnings[0].getMessage()


def test_no_warning_while_write_behind_can_help_or_prompts_reuse(engine, caplog):
    with caplog.at_level(logging.WARNING, logger="kvboost_rag"):
        for i in range(4):
            engine.generate(explicit([DOCS[i]]), max_new_tokens=1)  # cold, but queued for write-behind
        assert engine.flush_write_behind(timeout=60)
        for i in range(4):
            assert engine.generate(explicit([DOCS[i]]), max_new_tokens=1).reused_tokens > 0
    assert not [r for r in caplog.records if "reused no stored KV" in r.getMessage()]


# ---------------------------------------------------------------- live store
def test_engine_sees_documents_warmed_by_another_engine_on_the_same_directory(tmp_path):
    a = tiny_engine("llama", store=DiskStore(tmp_path), write_behind=False)
    b = KVBoostEngine(a.model, a.tokenizer, store=DiskStore(tmp_path))  # another "process"
    b.warm([DOCS[2]])
    flat = "Docs: " + DOCS[2] + "\nQ: where is the Colosseum?"
    r = a.generate(flat, max_new_tokens=2)
    assert r.reused_tokens > 0 and r.extra["documents_reused"] == 1
    assert a._store_watch.rescans == 1


def test_store_watch_is_rate_limited_and_quiet_when_nothing_changed(tmp_path):
    store = DiskStore(tmp_path)
    e = tiny_engine("llama", store=store)
    e.warm([DOCS[0]])
    old = time.time() - 60
    for d in [tmp_path, *[p for p in tmp_path.iterdir() if p.is_dir()]]:
        os.utime(d, (old, old))
    watch = StoreWatch(store)
    watch.interval_s = 3600.0
    assert not watch.changed()  # settled and unchanged: no re-scan
    e.warm([DOCS[1]])
    assert not watch.changed()  # within interval_s of the last check
    watch.interval_s = 0.0
    assert watch.changed() and watch.rescans == 1


# ---------------------------------------------------------------- recognition rules
def test_recognition_is_conservative():
    segs = [Segment.text(retrieval_qa([LONG[0], LONG[1]]))]
    assert recognise_documents(segs) == [LONG[0], LONG[1]]
    assert recognise_documents([Segment.text(llama_index_qa([LONG[2]]))]) == [LONG[2]]
    # instruction (first block) and question (last block) never count, however long
    assert recognise_documents([Segment.text(LONG[0] + "\n\n" + LONG[1])]) == []
    # single-newline joins and chat markers do not count
    assert recognise_documents([Segment.text("Context:\n" + "\n".join(LONG[:2]) + "\nQ?")]) == []
    assert recognise_documents([Segment.text(retrieval_qa([LONG[0] + "<|im_end|>"]))], ["<|im_end|>"]) == []
    # a block next to a detected document, after a newline, counts
    segs = [Segment.text("Context:\n\n"), Segment.document(DOCS[0]), Segment.text("\n\n" + LONG[3] + "\n\nQ?")]
    assert recognise_documents(segs) == [LONG[3]]


SHORT = ["The Colosseum is in Rome.", "Paris is the capital of France; it lies on the Seine.",
         "A tuple is an immutable sequence."]


def test_short_documents_and_the_first_one_after_a_label_are_recognised():
    """No minimum length (stock chains over one-sentence chunks reused nothing), and the document
    on the line right after a ``Context:`` label (it used to be glued to the instruction)."""
    assert recognise_documents([Segment.text(retrieval_qa(SHORT))]) == SHORT
    lcel = ("Answer the question based only on the following context:\n" + "\n\n".join(SHORT)
            + "\n\nQuestion: where is the Colosseum?")
    assert recognise_documents([Segment.text(lcel)]) == SHORT
    chat = [Segment.text("<|im_start|>user\nContext:\n" + "\n\n".join(SHORT) + "\n\nWhere?<|im_end|>\n")]
    assert recognise_documents(chat, ["<|im_start|>", "<|im_end|>"]) == SHORT


def test_the_prompts_own_words_are_never_documents():
    """Instruction (first block), question (last), labels, questions and headings in between."""
    assert recognise_documents([Segment.text("Be brief.\n\nWhere is it?")]) == []
    text = ("You help.\n\n# Tools\n\nUse the context below:\n\n" + SHORT[0] + "\n\nIs it in Rome?\n\n"
            + SHORT[1] + "\n\nQuestion: where?")
    assert recognise_documents([Segment.text(text)]) == [SHORT[0], SHORT[1]]
    assert recognise_documents([Segment.text("Answer this:\nWhere is it?\n\nThanks")]) == []


def test_no_nothing_reused_warning_for_prompts_without_documents(caplog):
    """Tool calls and structured output over a bare question could reuse nothing: not counted."""
    e = tiny_engine("llama", write_behind=False)
    with caplog.at_level(logging.WARNING, logger="kvboost_rag"):
        for _ in range(5):
            e.generate("What is the capital of France? Answer in one word.", max_new_tokens=1)
            e.generate(e.chat_segments([{"role": "user", "content": "Give me a city."}]), max_new_tokens=1)
    assert not [r for r in caplog.records if "reused no stored KV" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="kvboost_rag"):  # documents present, write-behind off: warned
        for i in range(4):
            e.generate(retrieval_qa([SHORT[i % 3], LONG[i]]), max_new_tokens=1)
    assert len([r for r in caplog.records if "reused no stored KV" in r.getMessage()]) == 1


def test_short_documents_of_a_flat_prompt_are_reused_on_second_use():
    e = tiny_engine("llama", store=MemoryStore())
    prompt = retrieval_qa(SHORT)
    first = e.generate(prompt, max_new_tokens=1)
    assert first.reused_tokens == 0
    assert e.flush_write_behind(timeout=60)
    second = e.generate(prompt, max_new_tokens=1)
    assert second.reused_tokens > 0 and second.extra["documents_reused"] == len(SHORT)


def test_a_script_that_exits_while_a_document_is_queued_exits_cleanly(tmp_path):
    """A daemon worker still encoding at interpreter exit is killed mid-write (or, inside torch,
    aborts the process: exit 134, "terminate called without an active exception"). The atexit
    hook lets the worker finish the queued document: the script exits 0 and its entry is on disk.
    The encoding is slowed so that it is always still queued or running when the script returns."""
    import subprocess
    import sys

    store_dir = tmp_path / "kv"
    script = tmp_path / "one_answer.py"
    script.write_text(
        "import time\n"
        "from kvboost_rag import DiskStore, Segment\n"
        "from kvboost_rag.testing.models import DOCS, tiny_engine\n"
        f"engine = tiny_engine(store=DiskStore({str(store_dir)!r}))\n"
        "encode = engine.encode_batch\n"
        "def slow_encode(texts):\n"
        "    time.sleep(2.0)\n"
        "    return encode(texts)\n"
        "engine.encode_batch = slow_encode\n"
        "engine.generate([Segment.document(DOCS[0]), 'Question?'], max_new_tokens=2)\n"
        "assert engine.write_behind.stats()['queued'] == 1\n"
        "print('answered')\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "answered" in out.stdout and "terminate called" not in out.stderr
    from kvboost_rag import DiskStore

    assert len(DiskStore(store_dir)) == 1, "the document being encoded at exit was lost"
