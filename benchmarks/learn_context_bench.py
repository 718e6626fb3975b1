"""Does the store get better with use? Accuracy of the default method on the multi-hop suite
before and after one pass of its queries with ``learn_context`` on.

One process, one model: the corpus is warmed the way ``warm_corpus`` does by default (each
document after its embedding neighbours); pass 1 answers every question with the full prefill
(the reference) and the default method while the engine counts which documents arrive together
and re-encodes documents after their most frequent partners in the background; after the
write-behind queue is flushed, pass 2 answers the same questions again with the default method.

    python benchmarks/learn_context_bench.py --model qwen2.5-coder-0.5b --dtype bfloat16 --questions 200
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF id, local folder, .gguf or packaged name (default SmolLM2)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the engine's choice)")
    p.add_argument("--questions", type=int, default=200, help="multi-hop questions (default 200)")
    p.add_argument("--suite-size", type=int, default=200, help="suite the questions are taken from (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--answer-tokens", type=int, default=24)
    p.add_argument("--json", metavar="OUT.json", default=None)
    args = p.parse_args(argv)

    import torch

    from kvboost_rag import KVBoostEngine, MemoryStore
    from kvboost_rag_bench.multihop import answer_correct, first_answer, multihop_suite
    from kvboost_rag_bench.runner import build_prompt, judge_against_full, machine_info

    docs, queries = multihop_suite(n_questions=args.suite_size, seed=args.seed)
    queries = queries[: args.questions]
    by_id = {d.id: d for d in docs}
    kw = {"dtype": args.dtype} if args.dtype else {}
    engine = KVBoostEngine.from_pretrained(args.model, store=MemoryStore(), learn_context=True, **kw)
    t0 = time.perf_counter()
    engine.warm([d.text for d in docs], context="auto")
    warm_s = time.perf_counter() - t0
    print(f"[learn] warmed {len(docs)} documents with context in {warm_s:.1f}s", file=sys.stderr, flush=True)

    def answer(prompt, **kw):
        res = engine.generate(prompt, max_new_tokens=args.answer_tokens, **kw)
        return first_answer(res.text), res

    rows = []
    with torch.inference_mode():
        prompts = [build_prompt(engine, [by_id[d].text for d in q.doc_ids], q.question) for q in queries]
        for i, (q, prompt) in enumerate(zip(queries, prompts)):
            full, _ = answer(prompt, strategy="full")
            first, _ = answer(prompt)
            rows.append({"id": q.id, "hops": q.meta["hops"], "gold": q.answer, "full": full, "pass1": first,
                         "full_ok": answer_correct(full, q.answer), "pass1_ok": answer_correct(first, q.answer)})
            print(f"[learn] pass 1 {i + 1}/{len(queries)}", file=sys.stderr, flush=True)
        engine.flush_write_behind()
        reencoded = engine.write_behind.stats()["reencoded"]
        for i, (row, q, prompt) in enumerate(zip(rows, queries, prompts)):
            second, _ = answer(prompt)
            row["pass2"], row["pass2_ok"] = second, answer_correct(second, q.answer)
            print(f"[learn] pass 2 {i + 1}/{len(queries)}", file=sys.stderr, flush=True)
        engine.flush_write_behind()

    full_ok = [r["full_ok"] for r in rows]
    hops = [r["hops"] for r in rows]
    summary = {}
    for name in ("full", "pass1", "pass2"):
        ok = [r[f"{name}_ok"] for r in rows]
        summary[name] = {"accuracy": sum(ok) / len(ok),
                         "accuracy_one_hop": _share(ok, hops, 1), "accuracy_two_hop": _share(ok, hops, 2)}
        if name != "full":
            summary[name].update(judge_against_full(full_ok, ok, hops))
    result = {"model": engine.model_name, "machine": machine_info(engine), "questions": len(rows),
              "answer_tokens": args.answer_tokens, "warm_s": warm_s,
              "reencoded_after_pass1": reencoded, "reencoded_total": engine.write_behind.stats()["reencoded"],
              "methods": summary, "per_query": rows}
    print(f"model {engine.model_name} | {len(rows)} questions | documents re-encoded after pass 1: {reencoded}")
    print(f"{'':8} {'accuracy':>8} {'1-hop':>6} {'2-hop':>6} {'retention':>14} {'verdict agree':>13}")
    for name, s in summary.items():
        ret = f"{s['retention']:.3f} ({s['retention_count']})" if "retention" in s else ""
        agree = f"{s['verdict_agree']:.3f}" if "verdict_agree" in s else ""
        print(f"{name:8} {s['accuracy']:8.3f} {s['accuracy_one_hop'] or 0:6.3f} {s['accuracy_two_hop'] or 0:6.3f} "
              f"{ret:>14} {agree:>13}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _share(ok, hops, h):
    sel = [o for o, x in zip(ok, hops) if x == h]
    return sum(sel) / len(sel) if sel else None


if __name__ == "__main__":
    sys.exit(main())
