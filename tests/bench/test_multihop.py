"""The generated multi-hop suite: determinism, shape, answerability invariants, lengths, metrics.

Fast and model-free except the length check, which uses SmolLM2's tokenizer (skipped when the
default model is not installed)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from kvboost_rag_bench import multihop as mh
from kvboost_rag_bench.datasets import Doc, Query

N_DOCS = 8


@pytest.fixture(scope="module")
def suite():
    return mh.multihop_suite()


def _dump(docs, queries) -> str:
    return json.dumps({"docs": [[d.id, d.text] for d in docs],
                       "queries": [[q.id, q.question, q.answer, q.doc_ids, q.topic, q.meta]
                                   for q in queries]}, sort_keys=True)


def _title(text: str) -> str:
    return text.split("\n", 1)[0]


def _has(text: str, phrase: str) -> bool:
    return mh.answer_correct(text, phrase)  # whole words of the normalized text


def _sentences(text: str) -> list:
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


# --------------------------------------------------------------------------- determinism
def test_same_seed_same_bytes_other_seed_differs(suite):
    a = _dump(*suite)
    assert a == _dump(*mh.multihop_suite(n_questions=200, seed=0))
    assert a != _dump(*mh.multihop_suite(n_questions=200, seed=1))


def test_same_bytes_across_processes_with_other_hash_seeds(suite):
    """No dependence on set/dict hash order: another interpreter with another PYTHONHASHSEED."""
    code = ("import hashlib, json, sys; from kvboost_rag_bench import multihop as mh; "
            "d, q = mh.multihop_suite(); "
            "print(hashlib.sha256(json.dumps({'docs': [[x.id, x.text] for x in d], "
            "'queries': [[y.id, y.question, y.answer, y.doc_ids, y.topic, y.meta] for y in q]}, "
            "sort_keys=True).encode()).hexdigest())")
    here = hashlib.sha256(_dump(*suite).encode()).hexdigest()
    for hash_seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             check=True, timeout=120)
        assert out.stdout.strip() == here


# ---------------------------------------------------------------------------------- shape
def test_types_counts_and_hop_mix(suite):
    docs, queries = suite
    assert all(isinstance(d, Doc) for d in docs) and all(isinstance(q, Query) for q in queries)
    assert len(queries) >= 200
    assert len({q.id for q in queries}) == len(queries)
    assert len({d.id for d in docs}) == len(docs)
    hops = Counter(q.meta["hops"] for q in queries)
    assert set(hops) == {1, 2}
    assert hops[2] >= len(queries) / 2
    # every template is used, and documents are shared across queries like a real index
    kinds = Counter(q.meta["kind"] for q in queries)
    assert set(kinds) == set(mh.ONE_HOP_KINDS) | set(mh.TWO_HOP_KINDS)
    uses = Counter(d for q in queries for d in q.meta["needed"])
    assert max(uses.values()) >= 3
    assert len(docs) < sum(len(q.doc_ids) for q in queries) / 4


def test_each_query_has_eight_distinct_known_docs_with_the_needed_ones(suite):
    docs, queries = suite
    ids = {d.id for d in docs}
    for q in queries:
        assert len(q.doc_ids) == N_DOCS and len(set(q.doc_ids)) == N_DOCS
        assert set(q.doc_ids) <= ids
        assert len(q.meta["needed"]) == q.meta["hops"]
        assert set(q.meta["needed"]) <= set(q.doc_ids)
        assert q.topic == q.meta["needed"][-1]
        assert q.answer and q.question.endswith("?")
        assert set(q.meta) >= {"hops", "needed", "kind"}


def test_needed_documents_sit_anywhere_in_retrieval_order(suite):
    _, queries = suite
    positions = Counter(q.doc_ids.index(n) for q in queries for n in q.meta["needed"])
    assert set(positions) == set(range(N_DOCS))           # first, every middle slot, last
    assert min(positions.values()) >= 10
    two = [q for q in queries if q.meta["hops"] == 2]
    gaps = Counter(q.doc_ids.index(q.meta["needed"][1]) - q.doc_ids.index(q.meta["needed"][0]) for q in two)
    assert any(g == 1 for g in gaps) and any(g == -1 for g in gaps)        # adjacent, both orders
    assert any(g >= 5 for g in gaps) and any(g <= -5 for g in gaps)        # far apart
    assert sum(n for g, n in gaps.items() if g > 0) >= len(two) / 4        # first hop earlier...
    assert sum(n for g, n in gaps.items() if g < 0) >= len(two) / 4        # ...or later


def test_other_sizes_and_bad_arguments():
    docs, queries = mh.multihop_suite(n_questions=20, seed=3, docs_per_query=4)
    assert len(queries) == 20 and all(len(q.doc_ids) == 4 for q in queries)
    assert sum(q.meta["hops"] == 2 for q in queries) >= 10
    _, big = mh.multihop_suite(n_questions=600, seed=5)
    assert len(big) == 600 and len({q.question for q in big}) == 600
    for kwargs in ({"n_questions": 0}, {"docs_per_query": 1}, {"two_hop_share": 1.5}):
        with pytest.raises(ValueError):
            mh.multihop_suite(**kwargs)


# ------------------------------------------------------------------------- answerability
def test_gold_is_in_the_answer_document_and_not_in_the_first_hop(suite):
    docs, queries = suite
    text = {d.id: d.text for d in docs}
    for q in queries:
        needed = q.meta["needed"]
        assert _has(text[needed[-1]], q.answer), (q.id, q.question, q.answer)
        assert _has(q.question, q.meta["subject"])
        assert _title(text[needed[0]]) == q.meta["subject"]
        if q.meta["hops"] == 2:
            first, second = text[needed[0]], text[needed[1]]
            assert not _has(first, q.answer), (q.id, q.question, q.answer)
            assert _title(second) == q.meta["bridge"]
            assert _has(first, q.meta["bridge"])               # the link the question follows
            assert not _has(q.question, q.meta["bridge"])      # ...which the question does not give


def test_distinct_names_one_document_per_entity(suite):
    docs, _ = suite
    titles = [_title(d.text) for d in docs]
    assert len(set(titles)) == len(titles)
    words = Counter(w for t in titles for w in t.split()
                    if w not in ("Pro", "Max", "One", "Lite", "Air", "Prime", "Plus", "Mark", "II", "S",
                                 "X", "Go", "Neo", "Systems", "Dynamics", "Instruments", "Works",
                                 "Industries", "Labs", "Technologies", "Manufacturing", "Engineering", "Group"))
    assert max(words.values()) == 1    # no invented word names two entities


# Statement words -> the only kind of document allowed to contain them. Each fact is stated in its
# own entity's document only, so a distractor can never restate (or contradict) a needed fact.
_FACT_WORDS = {
    r"\bborn\b": "person", r"\b(works for|works at|employed by)\b": "person",
    r"\bweigh|kilograms": "product", r"\b(launched|released|went on sale)\b": "product",
    r"\bled\b": "product", r"headquarter": "company", r"\b(founded|established)\b": "company",
    r"\bRiver\b": "city", r"\ba (mid-sized |historic )?city in\b": "city",
}


def test_facts_are_only_stated_in_their_own_entity_document(suite):
    docs, _ = suite
    people = [_title(d.text) for d in docs if d.id.startswith("person-")]
    for d in docs:
        kind = d.id.split("-", 1)[0]
        own = _title(d.text)
        for sentence in _sentences(d.text)[1:]:
            for pattern, allowed in _FACT_WORDS.items():
                if re.search(pattern, sentence, re.IGNORECASE):
                    assert kind == allowed, (d.id, sentence)
            if kind == "person" and re.search(r"\bborn\b", sentence, re.IGNORECASE):
                others = [t for t in people if t != own and _has(sentence, t)]
                assert not others, (d.id, sentence)


# The last fact of a question kind's path -> the words that state it.
_STATES = {
    "birthplace": r"\bborn\b", "birth_year": r"\bborn\b", "profession": r".", "employer": r"works|employed",
    "weight": r"weigh", "launch_year": r"launched|released|on sale", "maker": r"made by|manufactured by",
    "leader": r"\bled\b", "hq": r"headquarter", "founder": r"founded|established",
    "founded": r"founded|established", "country": r"city in", "river": r"River",
}


def test_no_distractor_states_another_value_for_the_asked_fact(suite):
    """A distractor's sentences that mention the entity the answer is about never state the asked
    fact with a competing value (another gold of the same question kind)."""
    docs, queries = suite
    text = {d.id: d.text for d in docs}
    values: dict = {}
    for q in queries:
        values.setdefault(q.meta["kind"], set()).add(q.answer)
    paths = {k: v[2] for k, v in {**mh.ONE_HOP_KINDS, **mh.TWO_HOP_KINDS}.items()}
    mentioned = 0
    for q in queries:
        about = q.meta["bridge"] or q.meta["subject"]
        states = _STATES[paths[q.meta["kind"]][-1]]
        others = values[q.meta["kind"]] - {q.answer}
        for doc_id in q.doc_ids:
            if doc_id in q.meta["needed"]:
                continue
            assert _title(text[doc_id]) != about
            for sentence in _sentences(text[doc_id]):
                if not _has(sentence, about):
                    continue
                mentioned += 1
                if re.search(states, sentence, re.IGNORECASE):
                    assert not [v for v in others if _has(sentence, v)], (q.id, doc_id, sentence)
    assert mentioned  # related distractors do mention the question's entities


def test_stated_facts_match_the_gold_answers(suite):
    """Parse the fact sentences back out of the documents and compare with one-hop golds."""
    docs, queries = suite
    text = {d.id: d.text for d in docs}
    patterns = {
        "person_birth_year": r"\b(1[89]\d\d)\b",
        "product_weight": r"\b(\d+) kilograms\b",
        "product_launch_year": r"\b((?:19|20)\d\d)\b",
        "company_founded": r"\b((?:19|20)\d\d)\b",
        "city_river": r"\b([A-Z][a-z]+) River\b",
    }
    seen = Counter()
    for q in queries:
        if q.meta["kind"] in patterns:
            found = set(re.findall(patterns[q.meta["kind"]], text[q.topic]))
            assert found == {q.answer}, (q.id, found, q.answer)
            seen[q.meta["kind"]] += 1
    assert set(seen) == set(patterns)


def test_filler_carries_no_digits(suite):
    docs, _ = suite
    # person: birth year; company: founding year; product: weight + launch year; city: none
    for d in docs:
        kind = d.id.split("-", 1)[0]
        assert len(re.findall(r"\d+", d.text)) == {"person": 1, "company": 1, "product": 2, "city": 0}[kind], d.id


# ------------------------------------------------------------------------------- lengths
def _smollm2_tokenizer():
    try:
        from transformers import AutoTokenizer

        from kvboost_rag.models.loading import resolve_model_source
        return AutoTokenizer.from_pretrained(resolve_model_source(None))
    except Exception as exc:  # pragma: no cover - the default model is not installed
        pytest.skip(f"SmolLM2 tokenizer unavailable: {exc}")


@pytest.mark.parametrize("seed", [0, 7])
def test_document_lengths_in_tokens(seed):
    tok = _smollm2_tokenizer()
    docs, queries = mh.multihop_suite(seed=seed)
    lengths = {d.id: len(tok(d.text, add_special_tokens=False)["input_ids"]) for d in docs}
    assert 150 <= min(lengths.values()) and max(lengths.values()) <= 400, \
        (min(lengths.items(), key=lambda kv: kv[1]), max(lengths.items(), key=lambda kv: kv[1]))
    # a prompt's eight documents are ~2k tokens
    totals = [sum(lengths[i] for i in q.doc_ids) for q in queries]
    assert 1500 <= min(totals) and max(totals) <= 3200


# ------------------------------------------------------------------------------- metrics
def test_answer_correct_matches_whole_normalized_words():
    assert mh.answer_correct("It weighs 14 kilograms.", "14")
    assert mh.answer_correct("14", "14")
    assert not mh.answer_correct("It weighs 140 kilograms.", "14")
    assert not mh.answer_correct("1914", "14")
    assert mh.answer_correct("The leader was Maren Holvik.", "Maren Holvik")
    assert mh.answer_correct("maren holvik", "Maren Holvik")
    assert not mh.answer_correct("Holvik", "Maren Holvik")
    assert mh.answer_correct("Quorvane Systems makes it.", "Quorvane")
    assert not mh.answer_correct("Quorvaned", "Quorvane")
    assert mh.answer_correct("a structural engineer", "structural engineer")
    assert not mh.answer_correct("", "14") and not mh.answer_correct(None, "14")
    assert not mh.answer_correct("anything", None)


def test_answers_agree():
    gold = "Brelmont"
    assert mh.answers_agree("Brelmont.", "She was born in Brelmont in 1962.", gold)   # both correct
    assert not mh.answers_agree("Brelmont", "Tarvohaven", gold)                       # one correct
    assert not mh.answers_agree("Tarvohaven", "Brelmont", gold)
    assert mh.answers_agree("Tarvohaven. She moved later.", "tarvohaven", gold)       # same wrong answer
    assert not mh.answers_agree("Tarvohaven", "Selmont", gold)                        # different wrong
    # without gold: normalized first sentence / line
    assert mh.answers_agree("The Ossel River.\nIt is long.", "ossel river. It flows north.", None)
    assert mh.answers_agree("It weighs 14.5 kg. Light.", "It weighs 14.5 kg!", None)
    assert not mh.answers_agree("Ossel", "Varn", None)
    assert not mh.answers_agree("", "", None)
    assert mh.first_answer("\n\n  The Ossel River. More.") == "ossel river"


def test_accuracy_by_hops():
    rows = ([{"hops": 1, "correct": True}] * 3 + [{"hops": 1, "correct": False}]
            + [{"meta": {"hops": 2}, "prediction": "born in Brelmont", "gold": "Brelmont"}]
            + [{"hops": 2, "text": "no idea", "answer": "Brelmont"}] * 3)
    out = mh.accuracy_by_hops(rows)
    assert out["overall"]["n"] == 8 and out["overall"]["accuracy"] == pytest.approx(0.5)
    assert out["one_hop"]["n"] == 4 and out["one_hop"]["accuracy"] == pytest.approx(0.75)
    assert out["two_hop"]["n"] == 4 and out["two_hop"]["accuracy"] == pytest.approx(0.25)
    for group in out.values():
        lo, hi = group["ci95"]
        assert 0.0 <= lo <= group["accuracy"] <= hi <= 1.0
    # the interval is the metrics module's Student-t one, clipped to [0, 1]
    from kvboost_rag_bench.metrics import mean_ci95
    mean, (lo, hi) = mean_ci95([1, 1, 1, 0])
    assert out["one_hop"]["ci95"] == [max(0.0, lo), min(1.0, hi)]
    empty = mh.accuracy_by_hops([])
    assert empty["overall"] == {"n": 0, "accuracy": None, "ci95": None}
    single = mh.accuracy_by_hops([{"hops": 1, "correct": 1}])
    assert single["one_hop"] == {"n": 1, "accuracy": 1.0, "ci95": None}
    assert single["two_hop"]["n"] == 0
