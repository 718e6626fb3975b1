"""Learning the context from traffic: co-retrieval counts and background re-encoding."""
from __future__ import annotations

import json

import pytest

from kvboost_rag import Segment
from kvboost_rag.index.coretrieval import FILE_NAME, CoRetrieval
from kvboost_rag.store.disk import DiskStore
from kvboost_rag.testing.models import DOCS, tiny_engine


def test_counts_pairs_and_ranks_partners():
    co = CoRetrieval()
    co.record(["a", "b", "c"])
    co.record(["a", "b"])
    co.record(["a", "d", "a"])  # a repeated key counts once
    assert co.count("a", "b") == 2 and co.count("b", "a") == 2 and co.count("a", "c") == 1
    assert co.partners("a", 3) == ["b"]                       # min_count 2 by default
    assert co.partners("a", 3, min_count=1) == ["b", "c", "d"]
    assert co.partners("a", 3, min_count=1, among={"c", "d"}) == ["c", "d"]
    assert co.partners("zzz", 3) == []


def test_bounded_by_documents_and_partners():
    co = CoRetrieval(max_docs=3, max_partners=2)
    co.record(["a", "b", "c", "d"])
    assert len(co) == 3 and co.count("a", "b") == 0          # the least recently seen is dropped
    assert all(len(co._counts[k]) <= 2 for k in co._counts)


def test_persists_atomically_and_ignores_a_damaged_file(tmp_path):
    path = tmp_path / FILE_NAME
    co = CoRetrieval(path, save_every=1)
    co.record(["a", "b"])
    assert json.loads(path.read_text())["counts"]["a"] == {"b": 1}
    assert CoRetrieval(path).count("a", "b") == 1
    path.write_text("{not json")
    assert len(CoRetrieval(path)) == 0
    path.write_text(json.dumps({"format": "other", "counts": {"a": {"b": 5}}}))
    assert len(CoRetrieval(path)) == 0


def _prompt(order):
    return ([Segment.text("<|im_start|>user\nRead these.\n\n")]
            + [s for i in order for s in (Segment.document(DOCS[i]), Segment.text("\n\n"))]
            + [Segment.text("Question: which city has the Colosseum?<|im_end|>\n<|im_start|>assistant\n")])


def test_documents_that_keep_arriving_together_are_reencoded_after_each_other(tmp_path):
    store = DiskStore(tmp_path)
    engine = tiny_engine("llama", store=store, learn_context=True)
    engine.warm(DOCS)
    ctx_key = engine.key_for_text(DOCS[0], "context")
    engine.generate(_prompt([0, 1, 2]), max_new_tokens=2)
    assert engine.flush_write_behind(60)
    assert store.get(ctx_key, engine.fingerprint) is None        # seen together once: nothing yet
    engine.generate(_prompt([2, 0, 1]), max_new_tokens=2)
    assert engine.flush_write_behind(60)
    chunk = store.get(ctx_key, engine.fingerprint)
    assert chunk is not None and chunk.meta["encoding"] == "context"
    partners = set(chunk.meta["context"].split(","))
    assert partners == {engine.key_for_text(DOCS[1]), engine.key_for_text(DOCS[2])}
    assert engine.write_behind.stats()["reencoded"] == 3
    assert chunk.start > len(engine.preamble_ids)                 # encoded after its partners
    result = engine.generate(_prompt([1, 2, 0]), max_new_tokens=2)
    assert result.reused_tokens > 0
    assert engine.flush_write_behind(60)
    assert engine.write_behind.stats()["reencoded"] == 3          # same partners: not re-encoded again
    engine.coretrieval.save()
    assert (tmp_path / FILE_NAME).is_file()
    reopened = DiskStore(tmp_path)                                # the table is the store's own file
    assert len(reopened) == len(store)
    again = tiny_engine("llama", store=reopened, learn_context=True)
    assert again.coretrieval.count(engine.key_for_text(DOCS[0]), engine.key_for_text(DOCS[1])) == 3


def test_off_by_default_records_nothing():
    engine = tiny_engine("llama")
    assert engine.coretrieval is None
    engine.warm(DOCS)
    engine.generate(_prompt([0, 1]), max_new_tokens=2)
    engine.generate(_prompt([0, 1]), max_new_tokens=2)
    assert engine.flush_write_behind(60)
    assert engine.write_behind.stats()["reencoded"] == 0


def test_learn_context_must_be_a_bool():
    from kvboost_rag import InvalidConfigError

    with pytest.raises(InvalidConfigError, match="learn_context"):
        tiny_engine("llama", learn_context="yes")
