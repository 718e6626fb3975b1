"""Entries are not trusted beyond their checksum: a hand-edited store whose checksum was
recomputed (fewer heads with a consistent header, a start outside the window, NaN values, another
document's KV under this document's ids) gives a miss with a logged, counted reason, never a crash
and never a served entry; ``DiskStore.verify`` names what the store alone can know."""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from kvboost_rag import Segment
from kvboost_rag.kv.chunk import KVChunk
from kvboost_rag.store.disk import DiskStore
from kvboost_rag.store.entry_format import _serialize
from kvboost_rag.store.memory import MemoryStore
from kvboost_rag.store.tiered import TieredStore
from kvboost_rag.testing.models import ARCHITECTURES, DOCS, tiny_engine

PROMPT = [Segment.text("Context:\n"), Segment.document(DOCS[1]), Segment.text("\n"), Segment.document(DOCS[0]),
          Segment.text("\nQuestion: which city?\nAnswer:")]


@pytest.fixture
def warmed(tmp_path):
    engine = tiny_engine("llama", store=DiskStore(tmp_path), write_behind=False)
    engine.warm(DOCS[:3])
    return engine


def _forge(engine, text: str, **changes) -> str:
    """Rewrite ``text``'s entry with ``changes`` applied and a valid checksum (a hand edit)."""
    key = engine.key_for_text(text)
    store = engine.store
    chunk = store.get(key, engine.fingerprint)
    forged = dataclasses.replace(chunk, **{"keys": chunk.keys.clone(), "values": chunk.values.clone(), **changes})
    store.path_for(key).write_bytes(_serialize(forged, 16))
    return key


def _fewer_heads(engine, text):
    c = engine.store.get(engine.key_for_text(text), engine.fingerprint)
    return {"keys": c.keys[:, :1].clone(), "values": c.values[:, :1].clone()}


def _nan_values(engine, text):
    c = engine.store.get(engine.key_for_text(text), engine.fingerprint)
    values = c.values.clone()
    values[:, 1, 10, 5] = float("nan")  # in every layer: the fetch's sample sees it whichever layer it reads
    return {"values": values}


def _another_documents_kv(engine, text):
    """Another document's KV, cut to this document's length, under this document's token ids."""
    mine = engine.store.get(engine.key_for_text(text), engine.fingerprint)
    other = engine.store.get(engine.key_for_text(DOCS[2]), engine.fingerprint)
    n = mine.num_tokens
    keys, values = (torch.cat([t, t], dim=2)[:, :, :n].clone() for t in (other.keys, other.values))
    return {"keys": keys, "values": values}


FORGERIES = {
    "fewer heads": _fewer_heads,
    "start 1e9": lambda e, t: {"start": 10**9},
    "NaN values": _nan_values,
    "another document's KV": _another_documents_kv,
}


@pytest.mark.parametrize("kind", list(FORGERIES))
def test_a_forged_entry_is_a_counted_miss_not_a_crash_or_a_wrong_answer(warmed, kind, caplog):
    key = _forge(warmed, DOCS[1], **FORGERIES[kind](warmed, DOCS[1]))
    with caplog.at_level(logging.WARNING, logger="kvboost_rag"):
        for _ in range(3):  # the values sample rotates over layers: never served on any call
            r = warmed.generate(PROMPT, max_new_tokens=2)
            assert r.extra["documents"] == 2 and r.extra["documents_reused"] == 1  # DOCS[0] only
    assert warmed.entry_check.rejected == 3 and key in warmed.entry_check.reasons
    logged = [rec.getMessage() for rec in caplog.records if key in rec.getMessage()]
    assert len(logged) == 1 and "not used" in logged[0]  # logged once per entry, counted every time


def test_reasons_name_what_is_wrong(warmed):
    expected = {"fewer heads": "KV shape", "start 1e9": "context window", "NaN values": "non-finite",
                "another document's KV": "layer-0 values"}
    for kind, make in FORGERIES.items():
        warmed.store.put(warmed.key_for_text(DOCS[1]), warmed.encode_batch([DOCS[1]])[0])
        key = _forge(warmed, DOCS[1], **make(warmed, DOCS[1]))
        warmed.generate(PROMPT, max_new_tokens=1)
        assert expected[kind] in warmed.entry_check.reasons[key], (kind, warmed.entry_check.reasons[key])
        warmed.entry_check.reasons.clear()


@pytest.mark.parametrize("tensor", ["keys", "values"])
def test_a_non_finite_element_anywhere_is_never_served(warmed, tensor):
    """The fetch samples a few layers; a NaN or infinity elsewhere poisons the blend's logits,
    and the prefill is redone without the entry (full check only on that path). ``reuse`` keeps
    every stored position (a NaN in a token the blend recomputes is overwritten: harmless)."""
    key = warmed.key_for_text(DOCS[1])
    genuine = warmed.encode_batch([DOCS[1]])[0]
    expected = warmed.generate(PROMPT, max_new_tokens=3, strategy="reuse")
    for layer in range(4):
        fresh = tiny_engine("llama", store=warmed.store, write_behind=False)  # the sample starts over
        t = getattr(genuine, tensor).clone()
        t[layer, 1, 4, 7] = float("inf") if layer % 2 else float("nan")
        warmed.store.path_for(key).write_bytes(_serialize(dataclasses.replace(genuine, **{tensor: t}), 16))
        for _ in range(2):
            r = fresh.generate(PROMPT, max_new_tokens=3, strategy="reuse")
            assert r.extra["documents_reused"] == 1, (tensor, layer)
            assert r.completion_tokens == 3
        assert fresh.entry_check.rejected >= 1 and key in fresh.entry_check.reasons
    warmed.store.path_for(key).write_bytes(_serialize(genuine, 16))
    assert warmed.generate(PROMPT, max_new_tokens=3, strategy="reuse").text == expected.text


def test_verify_names_what_the_store_can_know(tmp_path):
    engine = tiny_engine("llama", store=DiskStore(tmp_path), write_behind=False)
    engine.warm(DOCS)
    nan_key = _forge(engine, DOCS[0], **_nan_values(engine, DOCS[0]))
    start_key = _forge(engine, DOCS[1], start=-5)
    bad = dict(engine.store.verify())
    assert set(bad) == {nan_key, start_key}
    assert "non-finite values" in bad[nan_key]
    assert "start" in bad[start_key]


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_genuine_entries_pass_every_check_on_every_architecture(kind, tmp_path):
    engine = tiny_engine(kind, write_behind=False)
    engine.warm(DOCS)
    r = engine.generate(PROMPT, max_new_tokens=1)
    assert r.extra["documents_reused"] == 2 and engine.entry_check.rejected == 0


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_and_context_entries_pass(bits, tmp_path):
    engine = tiny_engine("llama", store=TieredStore(MemoryStore(), DiskStore(tmp_path, kv_bits=bits)),
                         write_behind=False)
    engine.warm(DOCS, context="auto")
    fresh = tiny_engine("llama", store=DiskStore(tmp_path, kv_bits=bits), write_behind=False)
    r = fresh.generate(PROMPT, max_new_tokens=1)
    assert r.extra["documents_reused"] == 2 and fresh.entry_check.rejected == 0


def test_bfloat16_model_entries_pass():
    engine = tiny_engine("llama", write_behind=False)
    engine.model.to(torch.bfloat16)
    engine = type(engine)(engine.model, engine.tokenizer, write_behind=False)
    engine.warm(DOCS)
    r = engine.generate(PROMPT, max_new_tokens=1)
    assert r.extra["documents_reused"] == 2 and engine.entry_check.rejected == 0
