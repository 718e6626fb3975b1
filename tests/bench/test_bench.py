"""Benchmark: metrics, corpus/query IO, JSON schema of a tiny run, random-weights path."""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import pytest
import torch

from kvboost_rag.fidelity import kl_top1
from kvboost_rag_bench import cli, datasets, metrics, random_models, report, runner
from kvboost_rag.testing.models import tiny_engine, word_tokenizer

VOCAB = 512  # word tokenizer and model vocabulary of the tiny benchmark runs


def tiny_bench_engine():
    return tiny_engine(tokenizer=word_tokenizer(VOCAB))


# ----------------------------------------------------------------------------- metrics
def test_token_f1_exact_partial_and_zero():
    assert metrics.token_f1("AssertionError", "AssertionError") == 1.0
    assert metrics.token_f1("The AssertionError.", "assertionerror") == 1.0   # case, article, punct
    assert metrics.token_f1("it raises AssertionError", "AssertionError") == pytest.approx(0.5)
    assert metrics.token_f1("nothing here", "AssertionError") == 0.0
    assert metrics.token_f1("", "") == 1.0
    assert metrics.token_f1("", "x") == 0.0
    # precision 2/3, recall 2/2 -> F1 0.8
    assert metrics.token_f1("radix 10 always", "radix 10") == pytest.approx(0.8)


def test_contains_answer():
    assert metrics.contains_answer('It raises "AssertionError" at once.', "AssertionError") == 1.0
    assert metrics.contains_answer("x < y and y <= z holds", "x < y and y <= z") == 1.0
    assert metrics.contains_answer("AssertionErrors", "AssertionError") == 0.0
    assert metrics.contains_answer("anything", "") == 0.0


def test_normalize_answer():
    assert metrics.normalize_answer("  The   (Pdb) prompt! ") == "pdb prompt"


def test_kl_top1_identical_is_zero():
    x = torch.randn(5, 11)
    kl, top1 = kl_top1(x, x.clone())
    assert kl == pytest.approx(0.0, abs=1e-6)
    assert top1 == 1.0


def test_kl_top1_known_values():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    q = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    kl, top1 = kl_top1(p.log(), q.log())
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)   # row 0; row 1 is 0
    assert kl == pytest.approx(expected / 2, rel=1e-5)
    # row 0: argmax(p) = 0 (tie broken to first), argmax(q) = 0 ; row 1 agree
    assert top1 == 1.0
    kl2, top12 = kl_top1(torch.tensor([[0.0, 2.0]]), torch.tensor([[2.0, 0.0]]))
    assert top12 == 0.0 and kl2 > 0
    # logits are shift-invariant
    kl3, _ = kl_top1(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[11.0, 12.0, 13.0]]))
    assert kl3 == pytest.approx(0.0, abs=1e-6)


def test_kl_top1_shape_mismatch():
    with pytest.raises(ValueError):
        kl_top1(torch.zeros(2, 3), torch.zeros(3, 3))


def test_mean_ci95():
    mean, ci = metrics.mean_ci95([1.0, 2.0, 3.0])
    assert mean == 2.0
    half = 4.303 * 1.0 / math.sqrt(3)
    assert ci == pytest.approx([2.0 - half, 2.0 + half])
    assert metrics.mean_ci95([5.0]) == (5.0, None)
    assert metrics.mean_ci95([]) == (None, None)


def test_methods_and_ratio_parsing():
    names = [m.name for m in runner.build_methods(runner.parse_ratios("0,0.05,0.15,0.3,1"))]
    assert names == ["full", "default", "reuse", "cacheblend@0.05", "cacheblend@0.15",
                     "cacheblend@0.3", "cacheblend@1"]
    assert runner.build_methods([0.15])[2].kwargs() == {"strategy": "cacheblend", "recompute_ratio": 0.15}
    assert runner.build_methods([])[1].kwargs() == {}
    with pytest.raises(ValueError):
        runner.parse_ratios("0.2,1.5")
    with pytest.raises(ValueError):
        runner.parse_ratios("a")
    assert runner.parse_int_list("16,2,4", "--plot-docs") == [2, 4, 16]
    assert runner.parse_int_list("", "--plot-docs") == []


def test_summarize_speedup_is_median_of_ratios():
    methods = runner.build_methods([0.15])
    per_query = []
    for full_t, cb_t in [(1.0, 0.5), (2.0, 0.5), (3.0, 3.0)]:
        row = lambda t: {"ttft_s": t, "prompt_tokens": 100, "reused_tokens": 80, "recomputed_tokens": 10,
                         "fresh_tokens": 20, "kl": 0.1, "top1": 0.9, "exact_match": 1.0, "f1": 0.5}
        per_query.append({"methods": {"full": row(full_t), "default": row(cb_t), "cacheblend@0.15": row(cb_t)}})
    s = runner.summarize(per_query, methods, has_gold=True)
    assert s["cacheblend@0.15"]["speedup_vs_full"] == 2.0      # ratios 2, 4, 1
    assert s["full"]["speedup_vs_full"] == 1.0
    assert s["cacheblend@0.15"]["ttft_median_s"] == 0.5
    assert s["cacheblend@0.15"]["reused_fraction"] == pytest.approx(0.8)
    assert s["cacheblend@0.15"]["recomputed_fraction"] == pytest.approx(0.1)
    assert s["cacheblend@0.15"]["kl_ci95"] == pytest.approx([0.1, 0.1])


# ----------------------------------------------------------------------------- datasets
def test_load_corpus_and_queries(tmp_path):
    c = tmp_path / "c.jsonl"
    c.write_text('{"id": "a", "text": "alpha"}\n\n{"id": "b", "text": "beta"}\n')
    q = tmp_path / "q.jsonl"
    q.write_text('{"id": 1, "question": "what?", "answer": "alpha", "doc_ids": ["b", "a"]}\n'
                 '{"id": 2, "question": "why?"}\n')
    docs = datasets.load_corpus(c)
    assert [(d.id, d.text) for d in docs] == [("a", "alpha"), ("b", "beta")]
    qs = datasets.load_queries(q)
    assert qs[0].id == "1" and qs[0].doc_ids == ["b", "a"] and qs[0].answer == "alpha"
    assert qs[1].doc_ids is None and qs[1].answer is None


@pytest.mark.parametrize("content,msg", [
    ('{"id": "a"}\n', "no \"text\""),
    ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "duplicate"),
    ('not json\n', "not valid JSON"),
    ('{"id": "a", "text": "  "}\n', "empty"),
    ('', "no documents"),
])
def test_load_corpus_errors(tmp_path, content, msg):
    p = tmp_path / "c.jsonl"
    p.write_text(content)
    with pytest.raises(ValueError, match=msg):
        datasets.load_corpus(p)


def test_attach_doc_ids_keeps_given_order_and_checks_ids():
    docs = [datasets.Doc(str(i), f"text {i}") for i in range(5)]
    qs = [datasets.Query("q", "?", doc_ids=["3", "1", "4", "0"])]
    datasets.attach_doc_ids(docs, qs, k=3)
    assert qs[0].doc_ids == ["3", "1", "4"]
    with pytest.raises(ValueError, match="unknown doc_ids"):
        datasets.attach_doc_ids(docs, [datasets.Query("q", "?", doc_ids=["9"])], k=3)


def _words(text: str) -> int:
    return len(text.split())


def test_cut_at_paragraphs():
    paras = [" ".join(["w"] * 30) for _ in range(10)]
    text = "\n\n".join(paras)
    out = datasets.cut_at_paragraphs(text, _words, min_tokens=50, max_tokens=100)
    assert out is not None and _words(out) == 90 and out.count("\n\n") == 2
    assert datasets.cut_at_paragraphs("short text", _words, min_tokens=50, max_tokens=100) is None
    # one huge paragraph: cut at line boundaries
    big = "\n".join(" ".join(["w"] * 10) for _ in range(30))
    out = datasets.cut_at_paragraphs(big, _words, min_tokens=50, max_tokens=100)
    assert _words(out) == 100


def test_builtin_corpus_sizes_and_questions():
    count = lambda t: len(t) // 4        # rough stand-in for a tokenizer
    docs = datasets.builtin_corpus(count)
    assert len(docs) >= 30
    assert all(250 <= count(d.text) <= 400 for d in docs)
    assert len({d.id for d in docs}) == len(docs)
    qa = datasets.builtin_queries()
    assert 18 <= len(qa) <= 25
    from pydoc_data.topics import topics
    for q in qa:
        # the gold answer is in the opening part of its topic (inside any 250-400 token cut)
        text = datasets._clean_topic(topics[q.topic])
        head = " ".join(text.translate(str.maketrans("", "", '"\u201c\u201d')).split())[:2000].lower()
        assert " ".join(q.answer.split()).lower() in head, (q.topic, q.answer)


# --------------------------------------------------------------------------------- CLI
def test_add_parser_registers_bench():
    parser = argparse.ArgumentParser(prog="kvboost-rag")
    sub = parser.add_subparsers(dest="command")
    cli.add_parser(sub)
    args = parser.parse_args(["bench", "--k", "16", "--ratios", "0,0.15", "--max-queries", "3",
                              "--json", "x.json", "--cold", "--kv-bits", "8"])
    assert args.func is cli.run_from_args
    assert args.k == 16 and args.ratios == "0,0.15" and args.max_queries == 3 and args.cold
    assert parser.parse_args(["bench", "--docs-per-query", "4"]).k == 4


def test_main_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    assert "--random-weights" in capsys.readouterr().out


def test_python_dash_m_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "kvboost_rag_bench", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "kvboost-rag bench" in out.stdout and "--random-weights" in out.stdout


def test_word_tokenizer_is_one_id_per_word():
    tok = word_tokenizer(VOCAB)
    rng = random.Random(0)
    text = random_models.random_text(rng, 37, random_models.word_count(tok))
    assert len(tok(text, add_special_tokens=True)["input_ids"]) == 37
    out = tok.apply_chat_template([{"role": "user", "content": "w1 w2"}], tokenize=False,
                                  add_generation_prompt=True)
    assert out.endswith("<|im_start|>assistant\n")


def test_random_config_builtin_and_file(tmp_path):
    cfg = random_models.load_random_config("llama3-8b")
    assert cfg.num_hidden_layers == 32 and cfg.num_key_value_heads == 8
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(random_models.RANDOM_CONFIGS["tiny"]))
    assert random_models.load_random_config(str(p)).hidden_size == 64
    with pytest.raises(ValueError):
        random_models.load_random_config("no-such-config")


def _fake_result():
    methods = {
        "full": {"ttft_median_s": 1.0, "speedup_vs_full": 1.0, "top1_agreement": 1.0, "kl_mean": 0.0,
                 "kl_ci95": [0.0, 0.0], "recompute_ratio": None},
        "reuse": {"ttft_median_s": 0.2, "speedup_vs_full": 5.0, "top1_agreement": 0.8, "kl_mean": 0.3,
                  "kl_ci95": [0.2, 0.4], "recompute_ratio": None},
        "cacheblend@0.15": {"ttft_median_s": 0.3, "speedup_vs_full": 3.3, "top1_agreement": 0.9,
                            "kl_mean": 0.05, "kl_ci95": None, "recompute_ratio": 0.15},
    }
    scaling = [{"n_docs": n, "context_tokens_median": 300 * n,
                "ttft_median_s": {"full": 0.1 * n, "cacheblend@0.15": 0.03 * n}} for n in (2, 4)]
    return {"model": "m", "n_queries": 2, "docs_per_query": 8, "context_tokens_median": 2400,
            "machine": {"device": "cpu", "dtype": "float32"}, "methods": methods, "scaling": scaling}


def test_format_table_and_plots(tmp_path):
    res = _fake_result()
    table = report.format_table(res)
    assert "cacheblend@0.15" in table and "3.30x" in table and "[0.2000, 0.4000]" in table
    paths = report.write_plots(res, tmp_path, "t")
    assert len(paths) == 2
    for p in paths:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------- tiny-engine runs
def _engine_available():
    try:
        from kvboost_rag import KVBoostEngine  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"engine not importable yet: {exc}")


METHOD_KEYS = {"strategy", "recompute_ratio", "ttft_median_s", "speedup_vs_full", "top1_agreement",
               "kl_mean", "kl_ci95", "greedy_exact_match", "answer_f1", "answer_contains_gold", "reused_fraction",
               "recomputed_fraction"}


def test_tiny_bench_json_schema(tmp_path):
    _engine_available()
    rng = random.Random(1)
    tok = word_tokenizer(VOCAB)
    n_words = random_models.word_count(tok)
    docs = [{"id": f"d{i}", "text": random_models.random_text(rng, 30, n_words)} for i in range(6)]
    queries = [{"id": f"q{i}", "question": random_models.random_text(rng, 6, n_words), "answer": "w1 w2",
                "doc_ids": rng.sample([d["id"] for d in docs], 4)} for i in range(3)]
    datasets.write_jsonl(tmp_path / "c.jsonl", docs)
    datasets.write_jsonl(tmp_path / "q.jsonl", queries)
    out = tmp_path / "out" / "b.json"
    args = cli.build_parser().parse_args([
        "--corpus", str(tmp_path / "c.jsonl"), "--queries", str(tmp_path / "q.jsonl"), "--k", "3",
        "--ratios", "0,0.15,1", "--max-queries", "2", "--answer-tokens", "4", "--json", str(out),
        "--plot-docs", "1,2", "--plot-queries", "1", "--quiet"])
    assert cli.run_from_args(args, engine=tiny_bench_engine()) == 0
    res = json.loads(out.read_text())
    assert set(res["methods"]) == {"full", "default", "reuse", "cacheblend@0.15", "cacheblend@1"}
    for name, m in res["methods"].items():
        assert METHOD_KEYS <= set(m), (name, METHOD_KEYS - set(m))
        assert m["ttft_median_s"] > 0
        assert 0.0 <= m["top1_agreement"] <= 1.0 and m["kl_mean"] >= 0
        assert m["answer_f1"] is not None
    full = res["methods"]["full"]
    assert full["speedup_vs_full"] == 1.0 and full["top1_agreement"] == 1.0 and full["kl_mean"] == 0.0
    assert full["greedy_exact_match"] == 1.0
    assert res["methods"]["reuse"]["reused_fraction"] > 0
    # ratio 1 recomputes everything: identical to full prefill up to float noise
    assert res["methods"]["cacheblend@1"]["top1_agreement"] == 1.0
    assert res["methods"]["cacheblend@1"]["kl_mean"] < 1e-3
    assert res["n_queries"] == 2 and res["docs_per_query"] == 3
    assert res["context_tokens_median"] > 90
    for key in ("platform", "cpu_count", "torch", "device"):
        assert key in res["machine"]
    assert res["model"]
    assert [s["n_docs"] for s in res["scaling"]] == [1, 2]
    assert [Path(p).name for p in res["plots"]] == ["b_ttft_vs_context.png", "b_ratio_curve.png", "b_frontier.png"]
    assert all(Path(p).exists() for p in res["plots"])
    assert res["per_query"][0]["doc_ids"] == queries[0]["doc_ids"][:3]
    for m in res["methods"].values():  # gold answers given: accuracy and agreement with the full prefill
        assert 0.0 <= m["answer_accuracy"] <= 1.0 and 0.0 <= m["agreement_with_full"] <= 1.0
    assert res["methods"]["full"]["agreement_with_full"] == 1.0


def test_multihop_suite_with_levers_and_variants_runs_through_the_cli(tmp_path):
    """--suite multihop: accuracy split by hops; --selections / --variant add methods that run with
    their own engine settings and leave the engine's configuration as it was."""
    _engine_available()
    engine = tiny_bench_engine()
    before = engine.config
    out = tmp_path / "m.json"
    args = cli.build_parser().parse_args([
        "--suite", "multihop", "--suite-size", "4", "--max-queries", "2", "--k", "2", "--ratios", "0.2",
        "--selections", "attention_docs", "--variant", "k12=reused_key_scale:1.2,sink_tokens:2",
        "--answer-tokens", "2", "--no-fidelity", "--warmup", "0", "--plot-docs", "", "--encodings", "isolated",
        "--json", str(out), "--quiet"])
    assert cli.run_from_args(args, engine=engine) == 0
    res = json.loads(out.read_text())
    # cacheblend@1: the multihop suite's noise floor, always added
    assert set(res["methods"]) == {"full", "default", "cacheblend@0.2", "attention_docs@0.2", "k12", "cacheblend@1"}
    assert engine.config == before
    for m in res["methods"].values():
        assert {"accuracy_one_hop", "accuracy_two_hop", "agreement_with_full", "answer_accuracy"} <= set(m)
        assert "top1_agreement" not in m  # --no-fidelity
    assert {q["hops"] for q in res["per_query"]} <= {1, 2}
    assert any(Path(p).name == "m_frontier.png" for p in res["plots"])


def test_bad_variants_and_selections_are_clear_errors():
    for spec in (["x=nope:1"], ["x="], ["=selection:attention"], ["x=recompute_ratio:2.0"]):
        with pytest.raises(Exception) as err:
            runner.parse_variants(spec)
        assert "variant" in str(err.value) or "recompute_ratio" in str(err.value)
    with pytest.raises(ValueError, match="unknown rule"):
        runner.parse_selections("attention,nonsense")


def test_random_weights_cli(tmp_path, capsys, monkeypatch):
    _engine_available()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out = tmp_path / "r.json"
    assert cli.main(["--random-weights", "tiny", "--device", "cpu", "--max-queries", "2", "--k", "3",
                       "--doc-tokens", "24", "--ratios", "0,0.3", "--plot-docs", "1,3",
                       "--plot-queries", "1", "--json", str(out), "--quiet"]) == 0
    res = json.loads(out.read_text())
    assert res["random_weights"] is True and res["model"] == "random:tiny"
    assert set(res["methods"]) == {"full", "default", "reuse", "cacheblend@0.3"}
    for m in res["methods"].values():
        assert m["ttft_median_s"] > 0 and m["speedup_vs_full"] > 0
        assert "top1_agreement" not in m
    assert res["context_tokens_median"] >= 3 * 24
    assert [s["n_docs"] for s in res["scaling"]] == [1, 3]
    assert "cacheblend@0.3" in capsys.readouterr().out
    import os
    assert "HF_HUB_OFFLINE" not in os.environ, "library code must not change the process environment"


# ------------------------------------------------------------------------- integration
@pytest.mark.integration
def test_builtin_real_model_two_queries(tmp_path):
    _engine_available()
    out = tmp_path / "real.json"
    t0 = time.perf_counter()
    # 3 documents, short answers, no warm-up round: ~15 s on an idle 2-core machine. Isolated
    # encoding: the default (context) warms the whole 50-document corpus after its neighbours,
    # ~70k tokens through the model (minutes on 2 cores); tests/bench/test_judgement.py runs it.
    assert cli.main(["--max-queries", "2", "--k", "3", "--ratios", "1", "--answer-tokens", "8",
                       "--warmup", "0", "--no-plot", "--encodings", "isolated", "--json", str(out), "--quiet"]) == 0
    res = json.loads(out.read_text())
    assert res["n_queries"] == 2 and res["source"].startswith("builtin")
    assert set(res["methods"]) == {"full", "default", "cacheblend@1"}
    assert res["methods"]["default"]["top1_agreement"] >= 0.5
    assert res["methods"]["default"]["reused_fraction"] > 0.5
    # recomputing every reused token reproduces the full prefill
    assert res["methods"]["cacheblend@1"]["top1_agreement"] >= 0.95
    assert res["methods"]["cacheblend@1"]["kl_mean"] < 1e-2
    assert res["retrieval"].startswith("all-MiniLM")
    print(f"integration bench took {time.perf_counter() - t0:.1f}s")


def test_run_bench_wrapper_passes_through(capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "run_bench", Path(__file__).resolve().parents[2] / "benchmarks" / "run_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit) as exc:
        mod.main(["--help"])
    assert exc.value.code == 0
    assert "--plot-docs" in capsys.readouterr().out


@pytest.mark.parametrize("flags,store", [(["--cold"], "DiskStore"), (["--cold", "--kv-bits", "8"], "DiskStore"),
                                         (["--kv-bits", "4"], "TieredStore")])
def test_random_weights_disk_stores(tmp_path, flags, store):
    _engine_available()
    out = tmp_path / "r.json"
    assert cli.main(["--random-weights", "tiny", "--device", "cpu", "--max-queries", "1", "--k", "2",
                       "--doc-tokens", "16", "--ratios", "0.15", "--no-plot", "--store-dir",
                       str(tmp_path / "store"), "--json", str(out), "--quiet", *flags]) == 0
    res = json.loads(out.read_text())
    assert res["store"].startswith(store)
    assert res["methods"]["cacheblend@0.15"]["reused_fraction"] > 0
    assert list((tmp_path / "store").rglob("*.safetensors"))


def test_profile_splits_each_prefill_by_phase_and_kind(tmp_path, capsys):
    """--profile: every blend method's time splits into the core's named phases (the probe only
    for the question-attention rule, none of them for a full prefill), by matmul/attention/other."""
    _engine_available()
    engine = tiny_bench_engine()
    out = tmp_path / "p.json"
    args = cli.build_parser().parse_args([
        "--suite", "multihop", "--suite-size", "4", "--max-queries", "2", "--k", "2", "--ratios", "0,0.2",
        "--answer-tokens", "2", "--no-fidelity", "--warmup", "0", "--no-plot", "--profile", "--no-noise-floor",
        "--encodings", "isolated", "--json", str(out), "--quiet"])
    assert cli.run_from_args(args, engine=engine) == 0
    prof = json.loads(out.read_text())["profile"]
    assert set(prof) == {"full", "default", "reuse", "cacheblend@0.2"}
    for name, res in prof.items():
        assert res["ttft_median_s"] > 0 and res["profiled_ms"] > 0
        for row in res["phases_ms"].values():
            assert abs(row["total"] - row["matmul"] - row["attention"] - row["other"]) < 1e-6
        assert abs(sum(r["total"] for r in res["phases_ms"].values()) - res["profiled_ms"]) < 1e-6
    from kvboost_rag.phases import PHASES

    for res in prof.values():   # every range the core opens is a declared phase
        assert set(res["phases_ms"]) <= set(PHASES) | {"unphased"}, set(res["phases_ms"])
    assert not {"probe", "selected_layers", "assemble"} & set(prof["full"]["phases_ms"])
    assert prof["full"]["phases_ms"]["unphased"]["attention"] > 0     # the fused kernel, by op name
    assert {"assemble", "probe", "selected_layers"} <= set(prof["default"]["phases_ms"])
    assert "probe" not in prof["reuse"]["phases_ms"]                  # ratio 0 ranks nothing
    assert prof["default"]["phases_ms"]["selected_layers"]["attention"] > 0
    assert prof["default"]["phases_ms"]["selected_layers"]["matmul"] > 0
    assert "selected_layers" in capsys.readouterr().out
