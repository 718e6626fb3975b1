"""Concurrent requests: sequential answers against 2/4/8 at once (continuous batching).

    python benchmarks/concurrency_bench.py [--concurrency 1,2,4,8] [--prompts 8] [--tokens 128]
                                           [--docs 8] [--smoke] [--json OUT.json]

Same process, same prompts (the built-in pydoc corpus, ``--docs`` retrieved documents each, warmed
first; ``--smoke``: the tiny random-weight model and corpus of the tests), ``--tokens`` new tokens
each. Concurrency 1 runs the prompts one after another twice: with the batch scheduler (as
``generate`` runs by default) and with ``batching=False`` (the engine as it was: the caller's
thread, under the lock), so a single request's overhead shows. Concurrency c > 1 submits all
prompts from c threads (``engine.generate``, no other user code). Reported: output tokens/s,
answers/s, TTFT p50/p95 (submission to first token, so queueing under load counts) and per-token
latency p50 (decode time / tokens after the first). If ``langchain_kvboost`` is importable, the
same load also runs through ``ChatKVBoost.abatch`` (flat prompts, documents found by detection).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvboost_rag_bench import datasets  # noqa: E402
from kvboost_rag_bench.runner import SYSTEM_PROMPT, build_prompt  # noqa: E402


def _pct(values, q):
    values = sorted(values)
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def load(args):
    if args.smoke:
        from kvboost_rag_bench.testing import DOCS, tiny_engine
        engine = tiny_engine(write_behind=False)
        engine.warm(DOCS)
        cases = []
        for i in range(args.prompts):
            texts = [DOCS[(i + j) % len(DOCS)] for j in range(min(args.docs, len(DOCS)))]
            cases.append((texts, f"what is item {i} ?" * (1 + i % 3)))
    else:
        from kvboost_rag import KVBoostEngine
        engine = KVBoostEngine.from_pretrained(write_behind=False)
        docs, queries = datasets.builtin_dataset(lambda text: len(engine.tokenize_document(text)))
        by_id = {d.id: d for d in docs}
        datasets.attach_doc_ids(docs, queries, args.docs)
        cases = []
        for query in queries[: args.prompts]:
            texts = [by_id[i].text for i in query.doc_ids[: args.docs]]
            engine.warm(texts)
            cases.append((texts, query.question))
    prompts = [build_prompt(engine, texts, question) for texts, question in cases]
    return engine, cases, prompts


def summarize(label, results, wall):
    tokens = sum(r.completion_tokens for r in results)
    ttfts = [r.ttft_s for r in results]
    per_token = [(r.total_s - r.ttft_s) / (r.completion_tokens - 1) for r in results if r.completion_tokens > 1]
    row = {"mode": label, "answers": len(results), "output_tokens": tokens, "wall_s": round(wall, 3),
           "tokens_per_s": round(tokens / wall, 2), "answers_per_s": round(len(results) / wall, 3),
           "ttft_p50_s": round(_pct(ttfts, 0.5), 3), "ttft_p95_s": round(_pct(ttfts, 0.95), 3),
           "per_token_p50_ms": round(1000 * _pct(per_token, 0.5), 1)}
    print(f"{label:>24}  {tokens:5d} tok  {wall:7.2f} s  {row['tokens_per_s']:7.2f} tok/s  "
          f"{row['answers_per_s']:6.3f} ans/s  TTFT p50 {row['ttft_p50_s']:.3f} s p95 {row['ttft_p95_s']:.3f} s  "
          f"per-token p50 {row['per_token_p50_ms']:.1f} ms", flush=True)
    return row


def run_sequential(engine, prompts, tokens, batching):
    engine.config = engine.config.replace(batching=batching)
    t0 = time.perf_counter()
    results = [engine.generate(p, max_new_tokens=tokens) for p in prompts]
    return results, time.perf_counter() - t0


def run_threads(engine, prompts, tokens, concurrency):
    engine.config = engine.config.replace(batching=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda p: engine.generate(p, max_new_tokens=tokens), prompts))
    return results, time.perf_counter() - t0


def run_langchain(engine, cases, tokens, concurrency):
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_kvboost import ChatKVBoost

    engine.config = engine.config.replace(batching=True)
    chat = ChatKVBoost(engine=engine, max_tokens=tokens)
    inputs = [[SystemMessage(SYSTEM_PROMPT),
               HumanMessage("Documents:\n\n" + "\n\n".join(texts) + f"\n\nQuestion: {question}")]
              for texts, question in cases]
    t0 = time.perf_counter()
    outs = asyncio.run(chat.abatch(inputs, config={"max_concurrency": concurrency}))
    wall = time.perf_counter() - t0
    tokens_out = sum((o.usage_metadata or {}).get("output_tokens", 0) for o in outs)
    row = {"mode": f"langchain abatch x{concurrency}", "answers": len(outs), "output_tokens": tokens_out,
           "wall_s": round(wall, 3), "tokens_per_s": round(tokens_out / wall, 2),
           "answers_per_s": round(len(outs) / wall, 3)}
    print(f"{row['mode']:>24}  {tokens_out:5d} tok  {wall:7.2f} s  {row['tokens_per_s']:7.2f} tok/s  "
          f"{row['answers_per_s']:6.3f} ans/s", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,2,4,8", help="comma-separated (1 = sequential)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per run (default 8)")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per answer (default 128)")
    p.add_argument("--docs", type=int, default=8, help="retrieved documents per prompt (default 8)")
    p.add_argument("--smoke", action="store_true", help="tiny random-weight model and corpus (seconds)")
    p.add_argument("--no-langchain", action="store_true", help="skip the ChatKVBoost.abatch run")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    engine, cases, prompts = load(args)
    engine.generate(prompts[0], max_new_tokens=4)  # warm-up (allocator, kernels)
    lengths = [engine.count_tokens(pr) for pr in prompts]
    print(f"{len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens, {args.tokens} new tokens each", flush=True)
    rows = []
    baseline = None
    for c in levels:
        if c <= 1:
            rows.append(summarize("sequential (batching off)", *run_sequential(engine, prompts, args.tokens, False)))
            baseline = rows[-1]["tokens_per_s"]
            rows.append(summarize("sequential (scheduler)", *run_sequential(engine, prompts, args.tokens, True)))
        else:
            rows.append(summarize(f"{c} concurrent threads", *run_threads(engine, prompts, args.tokens, c)))
            rows[-1]["scheduler"] = {k: v for k, v in engine.scheduler.snapshot().items()
                                     if k in ("max_batch_seen", "steps", "row_steps")}
        if baseline and c > 1:
            rows[-1]["speedup_vs_sequential"] = round(rows[-1]["tokens_per_s"] / baseline, 2)
            print(f"{'':>24}  {rows[-1]['speedup_vs_sequential']:.2f}x the sequential output tokens/s", flush=True)
    if not args.no_langchain:
        try:
            import langchain_kvboost  # noqa: F401
        except ImportError:
            print("langchain_kvboost not importable: abatch run skipped")
        else:
            rows.append(run_langchain(engine, cases, args.tokens, max(levels)))
            if baseline:
                rows[-1]["speedup_vs_sequential"] = round(rows[-1]["tokens_per_s"] / baseline, 2)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "prompt_tokens": lengths, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
