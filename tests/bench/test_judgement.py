"""Judging methods against the full prefill (retention, verdict agreement, the noise floor), the
faithfulness guard's query sets (--leakage, --distractors) and stored encodings (--encodings).

The metric and query-set tests are pure Python; the CLI runs use the tiny random-weight engine
(answers are gibberish, the plumbing is real). The index-time context run is skipped while the
core has no context encoding (``kvboost_rag/index/context.py`` plus ``EngineConfig.encodings``)."""
from __future__ import annotations

import json
import re

import pytest

from kvboost_rag_bench import cli, metrics, report, runner
from kvboost_rag_bench import multihop as mh
from kvboost_rag.testing.models import tiny_engine, word_tokenizer

VOCAB = 512
# the smallest multihop runs: 2 questions of 2 documents, 1-token answers, no plots, no fidelity pass
TINY_RUN = ["--suite", "multihop", "--suite-size", "4", "--max-queries", "2", "--k", "2", "--ratios", "0.2",
            "--answer-tokens", "1", "--no-fidelity", "--warmup", "0", "--no-plot", "--quiet"]


def tiny_bench_engine():
    return tiny_engine(tokenizer=word_tokenizer(VOCAB))


def _run(tmp_path, extra, engine=None, name="r.json"):
    out = tmp_path / name
    args = cli.build_parser().parse_args(TINY_RUN + list(extra) + ["--json", str(out)])
    engine = engine or tiny_bench_engine()
    assert cli.run_from_args(args, engine=engine) == 0
    return json.loads(out.read_text()), engine


def _title(text: str) -> str:
    return text.split("\n", 1)[0]


# --------------------------------------------------------------------------- metrics
def test_wilson_interval_known_values_and_empty():
    assert metrics.wilson_ci95(0, 0) is None
    assert metrics.wilson_ci95(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    lo, hi = metrics.wilson_ci95(10, 10)
    assert lo == pytest.approx(10 / (10 + 1.959964 ** 2), abs=1e-5) and hi == 1.0   # not degenerate at n/n
    assert metrics.wilson_ci95(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    with pytest.raises(ValueError):
        metrics.wilson_ci95(3, 2)


FULL = [1, 1, 1, 1, 0, 0, 1, 0]
METHOD = [1, 0, 1, 1, 1, 0, 1, 0]
HOPS = [1, 1, 2, 2, 1, 2, 2, 1]


def test_retention_and_verdict_agreement_on_hand_made_verdicts():
    # full correct on questions 0, 1, 2, 3, 6; the method keeps 0, 2, 3, 6 and adds 4
    ret = metrics.retention(FULL, METHOD)
    assert (ret["k"], ret["n"], ret["count"]) == (4, 5, "4/5") and ret["share"] == pytest.approx(0.8)
    assert ret["ci95"] == pytest.approx(metrics.wilson_ci95(4, 5))
    agree = metrics.verdict_agreement(FULL, METHOD)   # differ on questions 1 and 4
    assert agree["count"] == "6/8" and agree["share"] == pytest.approx(0.75)
    assert agree["ci95"] == pytest.approx(metrics.wilson_ci95(6, 8))
    by = mh.retention_by_hops(FULL, METHOD, HOPS)
    assert by["overall"]["count"] == "4/5"
    assert by["one_hop"]["count"] == "1/2" and by["one_hop"]["share"] == pytest.approx(0.5)
    assert by["two_hop"]["count"] == "3/3" and by["two_hop"]["share"] == 1.0
    # retention is not accuracy: the method's extra right answer (question 4) does not count
    assert sum(METHOD) / len(METHOD) == sum(FULL) / len(FULL) and ret["share"] < 1.0
    # the reference against itself
    assert metrics.retention(FULL, FULL)["share"] == 1.0 and metrics.verdict_agreement(FULL, FULL)["share"] == 1.0
    # None verdicts (no gold) are left out
    assert metrics.retention([1, None, 1], [1, 1, None])["count"] == "1/1"


def test_retention_empty_cases():
    for ref, meth in (([], []), ([0, 0, 0], [1, 1, 0])):   # nothing, or nothing the full prefill got right
        ret = metrics.retention(ref, meth)
        assert ret == {"k": 0, "n": 0, "share": None, "ci95": None, "count": "0/0"}
    assert metrics.verdict_agreement([], [])["share"] is None
    assert metrics.verdict_agreement([0, 0, 0], [1, 1, 0])["count"] == "1/3"
    by = mh.retention_by_hops([1, 0], [1, 1], [1, 1])
    assert by["two_hop"]["count"] == "0/0" and by["two_hop"]["share"] is None
    with pytest.raises(ValueError):
        metrics.retention([1, 0], [1])
    with pytest.raises(ValueError):
        mh.retention_by_hops([1], [1], [])


def _per_query(full, method):
    def row(c):
        return {"ttft_s": 1.0, "prompt_tokens": 10, "reused_tokens": 8, "recomputed_tokens": 1, "fresh_tokens": 1,
                "exact_match": 1.0, "f1": 0.0, "contains_answer": float(c), "agrees_with_full": 1.0}
    return [{"hops": h, "methods": {"full": row(f), "default": row(m), "cacheblend@1": row(f)}}
            for f, m, h in zip(full, method, HOPS)]


def test_summarize_reports_retention_accuracy_and_agreement_with_cis():
    methods = [runner.Method("full", "full", None), runner.Method("default", None, None),
               runner.Method("cacheblend@1", "cacheblend", 1.0)]
    s = runner.summarize(_per_query(FULL, METHOD), methods, has_gold=True)
    d = s["default"]
    assert d["retention"] == pytest.approx(0.8) and d["retention_count"] == "4/5"
    assert d["retention_ci95"] == pytest.approx(metrics.wilson_ci95(4, 5))
    assert d["retention_one_hop_count"] == "1/2" and d["retention_two_hop_count"] == "3/3"
    assert d["retention_one_hop_ci95"] == pytest.approx(metrics.wilson_ci95(1, 2))
    assert d["verdict_agree"] == pytest.approx(0.75) and d["verdict_agree_count"] == "6/8"
    # accuracy with its intervals and the exact-answer agreement are still there
    assert d["answer_accuracy"] == pytest.approx(5 / 8) and d["answer_accuracy_ci95"] is not None
    assert d["accuracy_one_hop"] == pytest.approx(0.5) and d["accuracy_two_hop"] == pytest.approx(0.75)
    assert d["accuracy_one_hop_ci95"] is not None and d["accuracy_two_hop_ci95"] is not None
    assert d["agreement_with_full"] == 1.0
    assert s["full"]["retention"] == 1.0 and s["full"]["verdict_agree"] == 1.0
    # the text: a retention column with counts, the judgement table and the noise floor beside it
    s["cacheblend@1"]["noise_floor"] = True
    result = {"model": "m", "n_queries": 8, "docs_per_query": 8, "context_tokens_median": 10,
              "machine": {"device": "cpu", "dtype": "float32"}, "methods": s, "noise_floor": "cacheblend@1"}
    table = report.format_table(result)
    assert "retention" in table and "0.800 (4/5)" in table
    assert "cacheblend@1 [noise floor]" in table
    judged = report.format_judgement(result)
    assert "1/2" in judged and "3/3" in judged and "6/8" in judged
    assert re.search(r"noise floor: cacheblend@1 .* keeps 1\.000 \[0\.\d\d, 1\.00\] 5/5", judged)


def test_encoding_methods_and_parsing():
    base = runner.build_methods([0.2, 1.0]) + [runner.Method("pinned", "cacheblend", None,
                                                             (("encodings", ("isolated",)),))]
    methods = runner.encoding_methods(base, ["context", "isolated"])
    names = [m.name for m in methods]
    assert names == ["full", "default", "default/isolated", "cacheblend@0.2", "cacheblend@0.2/isolated",
                     "cacheblend@1", "pinned"]
    by = {m.name: m for m in methods}
    assert dict(by["default"].overrides) == {"encodings": ("context",)} and by["default"].encoding == "context"
    assert dict(by["default/isolated"].overrides) == {"encodings": ("isolated",)}
    assert by["cacheblend@0.2/isolated"].kwargs() == {"strategy": "cacheblend", "recompute_ratio": 0.2}
    assert by["full"].overrides == () and by["cacheblend@1"].overrides == ()
    unpinned = runner.encoding_methods(base, ["isolated"], pin=False)
    assert [m.name for m in unpinned] == ["full", "default", "cacheblend@0.2", "cacheblend@1", "pinned"]
    assert all(m.overrides == () for m in unpinned[:4])
    assert runner.parse_encodings("isolated, context,isolated") == ["isolated", "context"]
    for bad in ("", "contextual", "context,none"):
        with pytest.raises(ValueError, match="--encodings"):
            runner.parse_encodings(bad)
    assert cli.build_parser().parse_args([]).encodings == "context"
    added = runner.with_noise_floor(runner.build_methods([0.2], ["attention_docs"]))
    assert [m.name for m in added] == ["full", "default", "cacheblend@0.2", "attention_docs@0.2", "cacheblend@1"]
    assert runner.is_noise_floor(added[-1]) and not runner.is_noise_floor(added[3])
    there = runner.build_methods([1.0, 0.2])
    assert runner.with_noise_floor(there) == there


# --------------------------------------------------------------------- guard query sets
@pytest.fixture(scope="module")
def guard():
    docs, _ = mh.multihop_suite(n_questions=200, seed=0)
    return {d.id: d.text for d in docs}, mh.guard_sets(200, 0, 8, leakage=60, distractors=60)


def test_guard_sets_are_deterministic_and_use_the_suite_documents(guard):
    text, sets = guard
    again = mh.guard_sets(200, 0, 8, leakage=60, distractors=60)
    dump = lambda s: [(q.id, q.question, q.answer, q.doc_ids, q.meta) for q in s["leakage"] + s["random_distractors"]]
    assert dump(again) == dump(sets)
    assert dump(mh.guard_sets(200, 1, 8, leakage=60, distractors=60)) != dump(sets)
    assert len(sets["leakage"]) == 60 and len(sets["random_distractors"]) == 60
    for q in sets["leakage"] + sets["random_distractors"]:
        assert set(q.doc_ids) <= set(text) and len(set(q.doc_ids)) == len(q.doc_ids) == 8
    assert mh.guard_sets(200, 0, 8) == {"leakage": [], "random_distractors": []}
    with pytest.raises(ValueError):
        mh.guard_sets(200, 0, 8, leakage=-1)


def test_leakage_queries_never_contain_the_answer_document(guard):
    text, sets = guard
    kinds = set()
    for q in sets["leakage"]:
        answer_doc = q.meta["answer_doc"]
        assert q.meta["hops"] == 1 and q.meta["needed"] == [] and q.topic == answer_doc
        assert answer_doc not in q.doc_ids
        assert mh.answer_correct(text[answer_doc], q.answer)          # answerable with the missing document...
        for d in q.doc_ids:                                           # ...and with nothing that is given
            assert not mh.answer_correct(text[d], q.answer), (q.id, d, q.answer)
        # its slot went to an entity of the same kind
        assert q.meta["replacement"] in q.doc_ids
        assert q.meta["replacement"].split("-", 1)[0] == answer_doc.split("-", 1)[0]
        assert mh.answer_correct(q.question, q.meta["subject"]) and _title(text[answer_doc]) == q.meta["subject"]
        kinds.add(q.meta["kind"])
    assert kinds == set(mh.ONE_HOP_KINDS)   # spread over every one-hop question kind


def test_random_distractor_queries_hold_the_needed_documents_and_nothing_related(guard):
    text, sets = guard
    hops = [q.meta["hops"] for q in sets["random_distractors"]]
    assert set(hops) == {1, 2} and hops.count(2) >= len(hops) / 2
    for q in sets["random_distractors"]:
        needed = q.meta["needed"]
        assert len(needed) == q.meta["hops"] and set(needed) <= set(q.doc_ids) and q.topic == needed[-1]
        assert mh.answer_correct(text[needed[-1]], q.answer)
        names = [q.meta["subject"]] + ([q.meta["bridge"]] if q.meta["bridge"] else [])
        for d in q.doc_ids:
            if d in needed:
                continue
            other = _title(text[d])
            assert other not in names
            assert not any(mh.answer_correct(text[d], n) for n in names), (q.id, d)          # names none of them
            assert not any(mh.answer_correct(text[n], other) for n in needed), (q.id, d)     # named by none
            assert not mh.answer_correct(text[d], q.answer), (q.id, d)
    # the same check fails on the main suite, whose distractors are related on purpose
    _, main = mh.multihop_suite(n_questions=200, seed=0)
    related = sum(any(mh.answer_correct(text[d], q.meta["subject"]) for d in q.doc_ids if d not in q.meta["needed"])
                  for q in main)
    assert related > len(main) / 4


# ------------------------------------------------------------------------ CLI runs
def test_noise_floor_is_added_unless_disabled(tmp_path, capsys):
    res, _ = _run(tmp_path, ["--encodings", "isolated", "--max-queries", "1"], name="a.json")
    assert "cacheblend@1" in res["methods"] and res["noise_floor"] == "cacheblend@1"   # --ratios 0.2 only
    floor = res["methods"]["cacheblend@1"]
    assert floor["noise_floor"] is True and floor["recompute_ratio"] == 1.0
    assert not any(m.get("noise_floor") for n, m in res["methods"].items() if n != "cacheblend@1")
    out = capsys.readouterr().out
    assert "cacheblend@1 [noise floor]" in out and "noise floor: cacheblend@1" in out
    res, _ = _run(tmp_path, ["--encodings", "isolated", "--max-queries", "1", "--no-noise-floor"], name="b.json")
    assert set(res["methods"]) == {"full", "default", "cacheblend@0.2"} and res["noise_floor"] is None
    assert "noise floor" not in capsys.readouterr().out


def test_encodings_isolated_with_the_guard_sets_through_the_cli(tmp_path, capsys):
    res, engine = _run(tmp_path, ["--encodings", "isolated", "--leakage", "2", "--distractors", "2"])
    assert res["encodings"] == ["isolated"] and res["encodings_requested"] == ["isolated"]
    assert set(res["methods"]) == {"full", "default", "cacheblend@0.2", "cacheblend@1"}
    assert all(m["encoding"] == ("isolated" if n not in ("full", "cacheblend@1") else None)
               for n, m in res["methods"].items())
    for m in res["methods"].values():
        assert {"retention", "retention_ci95", "retention_count", "retention_one_hop_count",
                "retention_two_hop_count", "verdict_agree", "verdict_agree_ci95", "answer_accuracy_ci95",
                "accuracy_one_hop", "accuracy_two_hop", "agreement_with_full"} <= set(m)
    assert res["methods"]["full"]["verdict_agree"] == 1.0
    # one encoding, warmed once, only the documents the questions use
    assert set(res["warm"]) >= {"isolated"} and "context" not in res["warm"]
    used = {d for q in res["per_query"] for d in q["doc_ids"]}
    used |= {d for q in res["leakage"]["per_query"] + res["random_distractors"]["per_query"] for d in q["doc_ids"]}
    assert res["warm"]["isolated"]["documents"] == len(used)
    assert res["warm"]["isolated"]["context_tokens"] == 0
    # the guard sets, reported apart from the main questions
    leak = res["leakage"]
    assert leak["n_questions"] == 2 and leak["answer_doc_in_context"] is None      # no context entries
    assert set(leak["methods"]) == set(res["methods"])
    for q in leak["per_query"]:
        assert q["answer_doc"] not in q["doc_ids"] and q["id"].startswith("leak")
    for m in leak["methods"].values():
        assert re.fullmatch(r"[0-2]/2", m["leaks"]) and 0.0 <= m["leak_rate"] <= 1.0 and m["leak_ci95"]
        assert "leaks_answer_in_context" not in m
    rand = res["random_distractors"]
    assert rand["n_questions"] == 2 and set(rand["methods"]) == set(res["methods"])
    for q in rand["per_query"]:
        assert set(q["needed"]) <= set(q["doc_ids"])
    for m in rand["methods"].values():
        assert {"answer_accuracy", "retention", "retention_count", "verdict_agree"} <= set(m)
    out = capsys.readouterr().out
    assert "leakage: 2 one-hop questions" in out and "random distractors: 2 questions" in out
    assert re.search(r"warm: isolated \d+\.\d\d s", out)
    assert re.search(r"retention", out.split("\n")[1])   # a column of the main table


def test_context_falls_back_to_isolated_without_core_support(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "context_support", lambda engine: False)
    res, _ = _run(tmp_path, ["--encodings", "context,isolated", "--max-queries", "1"])
    assert res["encodings"] == ["isolated"] and res["encodings_requested"] == ["context", "isolated"]
    assert res["context_encoding_available"] is False
    assert not any("/" in n for n in res["methods"])
    assert "this core has no index-time context encoding" in capsys.readouterr().out


def test_bad_guard_and_encoding_arguments_are_clear_errors():
    for argv in (["--leakage", "2"], ["--suite", "multihop", "--distractors", "-1"],
                 ["--suite", "multihop", "--encodings", "neighbours"]):
        with pytest.raises(SystemExit) as err:
            cli.run_from_args(cli.build_parser().parse_args(argv))
        assert "bench:" in str(err.value)


def test_context_and_isolated_encodings_side_by_side(tmp_path, capsys):
    """With the core's index-time context: both encodings warmed over the whole corpus, every
    reuse method twice (pinned to each encoding), the leakage set's context metadata checked."""
    engine = tiny_bench_engine()
    if not runner.context_support(engine):
        pytest.skip("the core has no index-time context encoding yet (kvboost_rag/index/context.py)")
    before = engine.config
    res, _ = _run(tmp_path, ["--encodings", "context,isolated", "--leakage", "2", "--max-queries", "1"], engine)
    assert res["encodings"] == ["context", "isolated"] and res["context_encoding_available"] is True
    assert set(res["methods"]) == {"full", "default", "default/isolated", "cacheblend@0.2",
                                   "cacheblend@0.2/isolated", "cacheblend@1"}
    assert res["methods"]["default"]["encoding"] == "context"
    assert res["methods"]["default/isolated"]["encoding"] == "isolated"
    assert engine.config == before
    docs, _ = mh.multihop_suite(n_questions=4, seed=0, docs_per_query=2)
    warm = res["warm"]
    for enc in ("context", "isolated"):     # the whole corpus, once per encoding
        assert warm[enc]["documents"] == len(docs) and warm[enc]["encoded"] > 0
    assert warm["context"]["context_encoded"] > 0 and warm["context"]["context_tokens"] > 0
    assert warm["isolated"]["context_encoded"] == 0 and warm["isolated"]["context_tokens"] == 0
    assert warm["context_vs_isolated"] == pytest.approx(warm["context"]["seconds"] / warm["isolated"]["seconds"])
    # both encodings are in the store under their own keys, with their metadata
    text = {d.id: d.text for d in docs}
    some = res["per_query"][0]["doc_ids"][0]
    ctx = engine.store.get(engine.key_for_text(text[some], encoding="context"), engine.fingerprint)
    iso = engine.store.get(engine.key_for_text(text[some]), engine.fingerprint)
    assert ctx.meta["encoding"] == "context" and iso.meta["encoding"] == "isolated"
    # leakage: whether the answer document sat in a retrieved document's context, from the store
    leak = res["leakage"]
    assert leak["answer_doc_in_context"] is not None
    for q in leak["per_query"]:
        answer_key = engine.key_for_text(text[q["answer_doc"]])
        holders = [d for d in q["doc_ids"] if answer_key in engine.store.get(
            engine.key_for_text(text[d], encoding="context"), engine.fingerprint).meta["context"].split(",")]
        assert q["answer_doc_in_context_of"] == holders and q["answer_doc_in_context"] == bool(holders)
    for m in leak["methods"].values():
        assert "leaks_answer_in_context" in m and "leaks_answer_not_in_context" in m
    out = capsys.readouterr().out
    assert re.search(r"warm: context \d+\.\d\d s, isolated \d+\.\d\d s \(\d+\.\dx\)", out)
