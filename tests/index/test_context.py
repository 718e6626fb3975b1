"""Index-time context: documents encoded after their nearest neighbours, stored under their own key."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from kvboost_rag import InvalidConfigError, MemoryStore, Segment
from kvboost_rag.index.context import ContextConfig, arrange, as_embedder, context_config, embed, nearest_neighbours
from kvboost_rag.testing.models import DOCS, tiny_engine

# Four documents of two topics: 0 and 2 are about cities, 1 and 3 about languages.
TOPIC = {0: "city", 1: "language", 2: "city", 3: "language"}


def topic_embedder(texts):
    """Deterministic 3-d vectors: a topic axis plus a small per-text offset (so ties are broken)."""
    out = []
    for t in texts:
        i = DOCS.index(t) if t in DOCS else -1
        base = [1.0, 0.0] if TOPIC.get(i) == "city" else [0.0, 1.0]
        jitter = int(hashlib.sha256(t.encode()).hexdigest()[:4], 16) / 65535 * 0.1
        out.append(base + [jitter])
    return np.array(out, dtype="float32")


@pytest.fixture()
def engine():
    return tiny_engine("llama", store=MemoryStore())


def test_neighbours_are_the_most_similar_other_texts():
    near = nearest_neighbours(DOCS, 1, topic_embedder)
    assert near == [[2], [3], [0], [1]]
    near2 = nearest_neighbours(DOCS, 3, topic_embedder)
    assert [n[0] for n in near2] == [2, 3, 0, 1] and all(i not in n for i, n in enumerate(near2))
    assert nearest_neighbours(DOCS[:1], 3, topic_embedder) == [[]]


def test_duplicate_texts_are_never_each_others_context():
    texts = [DOCS[0], DOCS[0], DOCS[2]]
    near = nearest_neighbours(texts, 2, topic_embedder)
    assert near[:2] == [[2], [2]]
    assert len(near[2]) == 1 and texts[near[2][0]] == DOCS[0]  # the repeated text counts once


def test_arrange_orders_and_budgets():
    a, b, c = [1, 1], [2, 2, 2], [3]
    assert arrange([a, b, c], "nearest_last", None) == [3, 2, 2, 2, 1, 1]
    assert arrange([a, b, c], "nearest_first", None) == [1, 1, 2, 2, 2, 3]
    assert arrange([a, b, c], "nearest_last", 5) == [2, 2, 2, 1, 1]      # the farthest is dropped
    assert arrange([a, b, c], "nearest_last", None, room=2) == [1, 1]    # the window's room counts too
    assert arrange([a, b, c], "nearest_last", 1) == []


def test_context_encoded_kv_is_the_documents_kv_after_its_neighbours(engine):
    """The stored KV of a context-encoded document equals a full prefill's KV of
    [preamble][neighbour][document] at the document's positions, and ``start`` is where it sat
    (context computed with the document: no isolated entry is written)."""
    cfg = ContextConfig(neighbours=1, embedder=topic_embedder, neighbour_kv="computed")
    report = engine.warm(DOCS, context=cfg)
    assert report.encoding == "context" and report.encoded == 4 and report.context_encoded == 4
    doc, neighbour = DOCS[0], DOCS[2]
    n_ids, d_ids = engine.tokenize_document(neighbour), engine.tokenize_document(doc)
    assert report.context_tokens == sum(len(engine.tokenize_document(DOCS[j])) for j in (2, 3, 0, 1))
    chunk = engine.store.get(engine.key_for_text(doc, "context"), engine.fingerprint)
    assert chunk is not None and engine.store.get(engine.key_for_text(doc), engine.fingerprint) is None
    start = len(engine.preamble_ids) + len(n_ids)
    assert chunk.start == start and list(chunk.token_ids) == d_ids
    assert chunk.meta["encoding"] == "context"
    assert chunk.meta["context"] == engine.key_for_text(neighbour)  # the neighbour's isolated key
    ids = torch.tensor([engine.preamble_ids + n_ids + d_ids])
    with torch.inference_mode():
        out = engine.model(input_ids=ids, use_cache=True)
    for layer, (k, v) in enumerate((lay.keys, lay.values) for lay in out.past_key_values.layers):
        torch.testing.assert_close(chunk.keys[layer], k[0, :, start:start + len(d_ids)], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(chunk.values[layer], v[0, :, start:start + len(d_ids)], atol=1e-5, rtol=1e-4)


def test_isolated_encoding_is_unchanged_and_both_kinds_coexist(engine):
    iso = engine.warm(DOCS)
    assert iso.encoding == "isolated" and iso.context_encoded == 0
    chunk = engine.store.get(engine.key_for_text(DOCS[0]), engine.fingerprint)
    assert chunk.start == len(engine.preamble_ids) and chunk.meta["encoding"] == "isolated" and chunk.meta["context"] == ""
    ctx = engine.warm(DOCS, context=ContextConfig(neighbours=2, embedder=topic_embedder))
    assert ctx.encoded == 4 and ctx.skipped == 0  # another key: the isolated entries do not count
    again = engine.warm(DOCS, context=ContextConfig(neighbours=2, embedder=topic_embedder))
    assert again.encoded == 0 and again.skipped == 4  # resumable
    assert engine.store.get(engine.key_for_text(DOCS[0]), engine.fingerprint) is not None


def _prompt(order):
    return ([Segment.text("<|im_start|>user\nRead these.\n\n")]
            + [s for i in order for s in (Segment.document(DOCS[i]), Segment.text("\n\n"))]
            + [Segment.text("Question: which city has the Colosseum?<|im_end|>\n<|im_start|>assistant\n")])


def _doc_kv(prefill, start, n):
    return torch.stack([lay.keys[0, :, start:start + n] for lay in prefill.cache.layers])


def test_lookup_prefers_context_entries_and_mixes_kinds(engine):
    engine.warm(DOCS)                                            # isolated entries for all four
    engine.warm(DOCS[:2] + DOCS[2:3], context=ContextConfig(neighbours=1, embedder=topic_embedder))
    iso_engine = tiny_engine("llama", store=engine.store, encodings=("isolated",))
    prompt = _prompt([3, 0, 2, 1])
    mixed = engine.prefill(prompt, strategy="reuse")
    alone = iso_engine.prefill(prompt, strategy="reuse")
    assert mixed.stats.documents_reused == alone.stats.documents_reused == 4
    tok = engine.tokenize(prompt)
    starts = {DOCS.index(seg.text): (s, e - s) for s, e, seg in tok.documents}
    # document 3 has only an isolated entry: both engines place the same KV
    s, n = starts[3]
    torch.testing.assert_close(_doc_kv(mixed, s, n), _doc_kv(alone, s, n))
    # document 0 has a context entry: the default engine uses it, the isolated-only engine does not
    s, n = starts[0]
    assert not torch.allclose(_doc_kv(mixed, s, n), _doc_kv(alone, s, n))
    assert engine.is_warm(DOCS[0]) and iso_engine.is_warm(DOCS[3])


def test_ratio_one_over_context_entries_equals_full_prefill(engine):
    engine.warm(DOCS, context=ContextConfig(neighbours=2, embedder=topic_embedder))
    prompt = _prompt([2, 0, 3, 1])
    full = engine.prefill(prompt, strategy="full")
    blended = engine.prefill(prompt, recompute_ratio=1.0)
    assert blended.stats.documents_reused == 4
    assert (full.logits - blended.logits).abs().max().item() <= 1e-4


def test_context_budget_limits_the_extra_tokens(engine):
    budget = 10
    report = engine.warm(DOCS, context=ContextConfig(neighbours=3, max_tokens=budget, embedder=topic_embedder))
    shortest = min(len(engine.tokenize_document(d)) for d in DOCS)
    assert shortest > budget and report.context_tokens == 0  # no neighbour fits: encoded alone, still "context"


def test_framework_embedders_are_accepted():
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from llama_index.core.embeddings import MockEmbedding

    lc = as_embedder(DeterministicFakeEmbedding(size=8))
    assert np.asarray(lc(["a", "b"])).shape == (2, 8)
    li = as_embedder(MockEmbedding(embed_dim=6))
    assert np.asarray(li(["a", "b", "c"])).shape == (3, 6)
    assert embed(["x", "y"], DeterministicFakeEmbedding(size=4)).shape == (2, 4)
    assert context_config(DeterministicFakeEmbedding(size=4)).embedder is not None


def test_langchain_vector_store_gives_its_embeddings(engine):
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from langchain_core.vectorstores import InMemoryVectorStore

    store = InMemoryVectorStore(DeterministicFakeEmbedding(size=16))
    report = engine.warm(DOCS, context=store)
    assert report.encoding == "context" and report.context_encoded == 4


@pytest.mark.parametrize("bad", [dict(neighbours=-1), dict(neighbours=1.5), dict(neighbours=True),
                                 dict(max_tokens=0), dict(order="random"), dict(embedder=5)])
def test_bad_context_config_is_a_clear_error(bad):
    with pytest.raises(InvalidConfigError):
        ContextConfig(**bad)


def test_bad_context_arguments_are_clear_errors(engine):
    with pytest.raises(InvalidConfigError, match="context must be"):
        engine.warm(DOCS, context="nearby")
    with pytest.raises(InvalidConfigError, match="one vector per text"):
        engine.warm(DOCS, context=ContextConfig(embedder=lambda texts: np.zeros((1, 3))))
    assert len(engine.store) == 0  # nothing written before the error
    with pytest.raises(InvalidConfigError, match="encodings"):
        tiny_engine("llama", encodings=("contextual",))


def test_context_none_and_zero_neighbours_mean_isolated():
    assert context_config(None) is None and context_config("none") is None
    assert context_config(ContextConfig(neighbours=0)) is None
    assert context_config("auto") == ContextConfig()


def test_warm_corpus_default_uses_context_and_cli_can_turn_it_off(tmp_path):
    from kvboost_rag import warm_corpus

    engine = tiny_engine("llama", store=MemoryStore())
    report = warm_corpus(DOCS, engine, progress=False)            # the packaged MiniLM picks neighbours
    assert report.encoding == "context" and report.context_encoded == 4 and report.context_tokens > 0
    assert report.isolated_encoded == 4  # stored neighbour KV (the default): isolated entries first
    off = warm_corpus(DOCS, tiny_engine("llama", store=MemoryStore()), progress=False, context="none")
    assert off.encoding == "isolated" and off.encoded == 4 and off.isolated_encoded == 0


def test_inspect_shows_context_entries_and_verify_names_a_forged_context(tmp_path, capsys):
    import json

    from kvboost_rag.app.cli import main
    from kvboost_rag.store.disk import DiskStore

    store = DiskStore(tmp_path)
    engine = tiny_engine("llama", store=store)
    engine.warm(DOCS[:2])
    engine.warm(DOCS, context=ContextConfig(neighbours=1, embedder=topic_embedder))
    capsys.readouterr()
    assert main(["inspect", "--store", str(tmp_path), "--json"]) == 0
    models = json.loads(capsys.readouterr().out)["models"]
    assert [(m["entries"], m["with_context"]) for m in models.values()] == [(8, 4)]  # 4 isolated, 4 context
    infos = {i.key: i for i in store.entries()}
    ctx_info = infos[engine.key_for_text(DOCS[0], "context")]
    assert ctx_info.encoding == "context" and ctx_info.context == (engine.key_for_text(DOCS[2]),)
    assert infos[engine.key_for_text(DOCS[0])].context == ()
    # an isolated entry that claims a context (a hand-edited or buggy store) is named by --verify
    chunk = store.get(engine.key_for_text(DOCS[1]), engine.fingerprint)
    chunk.meta["context"] = "not-a-key"
    store.delete(engine.key_for_text(DOCS[1]))
    store.put(engine.key_for_text(DOCS[1]), chunk)
    assert main(["inspect", "--store", str(tmp_path), "--verify"]) == 1
    out = capsys.readouterr().out
    assert engine.key_for_text(DOCS[1]) in out and "context" in out
    assert store.get(engine.key_for_text(DOCS[1]), engine.fingerprint) is None  # a miss, never served


def test_stored_neighbour_kv_with_one_neighbour_equals_computing_it(engine):
    """With one neighbour, its isolated entry sits exactly where it was encoded (right after the
    preamble), so placing its stored KV before the document gives the computed context's KV."""
    computed = engine.warm(DOCS, context=ContextConfig(neighbours=1, embedder=topic_embedder))
    exact = {t: engine.store.get(engine.key_for_text(t, "context"), engine.fingerprint) for t in DOCS}
    other = tiny_engine("llama", store=MemoryStore())
    report = other.warm(DOCS, context=ContextConfig(neighbours=1, embedder=topic_embedder, neighbour_kv="stored"))
    assert report.isolated_encoded == 4 and report.context_encoded == 4
    assert report.context_tokens == computed.context_tokens
    for t in DOCS:
        got = other.store.get(other.key_for_text(t, "context"), other.fingerprint)
        assert got.start == exact[t].start and got.meta["context"] == exact[t].meta["context"]
        torch.testing.assert_close(got.keys, exact[t].keys, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(got.values, exact[t].values, atol=1e-4, rtol=1e-3)
    assert other.store.get(other.key_for_text(DOCS[0]), other.fingerprint) is not None  # isolated kept too


def test_stored_neighbour_kv_with_two_neighbours_is_placed_in_order(engine):
    report = engine.warm(DOCS, context=ContextConfig(neighbours=2, embedder=topic_embedder, neighbour_kv="stored"))
    chunk = engine.store.get(engine.key_for_text(DOCS[0], "context"), engine.fingerprint)
    near = nearest_neighbours(DOCS, 2, topic_embedder)[0]
    assert chunk.meta["context"] == ",".join(engine.key_for_text(DOCS[j]) for j in near)
    assert chunk.start == len(engine.preamble_ids) + sum(len(engine.tokenize_document(DOCS[j])) for j in near)
    assert report.context_encoded == 4
    with pytest.raises(InvalidConfigError, match="neighbour_kv"):
        ContextConfig(neighbour_kv="cached")
