"""Compare blend selection rules on the real model: fidelity against a full prefill.

Each query's reference (the full prefill's greedy 32-token answer and its teacher-forced
logits) is computed once; every rule is then scored against it (top-1 agreement, KL) and
timed (TTFT relative to the full prefill measured right before it). Used to pick the engine's
default configuration; the numbers go in the README.

    python benchmarks/selection_rules.py --queries 8 --docs 8
    # the benchmark's own prompts: retrieved documents in retrieval order
    python benchmarks/selection_rules.py --queries 20 --retrieval --rules attention@0.05+sinks4,...
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import warnings

import torch

from kvboost_rag import KVBoostEngine
from kvboost_rag.blend import BlendConfig
from kvboost_rag.fidelity import greedy_reference, kl_top1
from kvboost_rag_bench.datasets import attach_doc_ids, builtin_dataset
from kvboost_rag_bench.runner import build_prompt

RULES = {
    "value@0.15": dict(selection="value", recompute_ratio=0.15),
    "value@0.15+sinks4": dict(selection="value", recompute_ratio=0.15, sink_tokens=4),
    "key@0.15+sinks4": dict(selection="key", recompute_ratio=0.15, sink_tokens=4),
    "attention@0.15": dict(selection="attention", recompute_ratio=0.15),
    "attention@0.15+sinks4": dict(selection="attention", recompute_ratio=0.15, sink_tokens=4),
    "attention@0.05+sinks4": dict(selection="attention", recompute_ratio=0.05, sink_tokens=4),
    "attention@0.05+sinks16": dict(selection="attention", recompute_ratio=0.05, sink_tokens=16),
    "attention@0.1+sinks4": dict(selection="attention", recompute_ratio=0.1, sink_tokens=4),
    "attention@0.1+sinks16": dict(selection="attention", recompute_ratio=0.1, sink_tokens=16),
    "attention@0.2": dict(selection="attention", recompute_ratio=0.2),
    "attention@0.2+sinks4": dict(selection="attention", recompute_ratio=0.2, sink_tokens=4),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--json", default=None)
    ap.add_argument("--retrieval", action="store_true",
                    help="the benchmark's prompts (top --docs by MiniLM + FAISS, retrieval order) instead of "
                         "the question's topic plus random documents, shuffled")
    ap.add_argument("--match-preamble", action="store_true",
                    help="encode documents after the prompts' own leading text instead of the engine's default preamble")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    engine = KVBoostEngine.from_pretrained()
    if args.match_preamble:
        leading = build_prompt(engine, ["x"], "q")[0].text
        engine = KVBoostEngine(engine.model, engine.tokenizer, preamble=leading)
    docs, queries = builtin_dataset(lambda t: len(engine.tokenize_document(t)))
    if args.retrieval:
        attach_doc_ids(docs, queries, args.docs)
    engine.warm([d.text for d in docs], batch_size=8)
    rng = random.Random(0)
    by_id = {d.id: d for d in docs}
    rules = {name: RULES[name] for name in args.rules.split(",")}
    rows = {name: [] for name in rules}
    for q in queries[: args.queries]:
        if args.retrieval:
            ids = q.doc_ids[: args.docs]
        else:  # the question's own topic plus random others, shuffled
            ids = [q.topic] + rng.sample([d.id for d in docs if d.id != q.topic], args.docs - 1)
            rng.shuffle(ids)
        prompt = build_prompt(engine, [by_id[i].text for i in ids], q.question)
        answer, ref = greedy_reference(engine, prompt, 32)
        full_ttft = engine.prefill(prompt, strategy="full").ttft_s
        engine.prefill(prompt)  # fills the prefix cache (the leading text is the same in every prompt)
        for name, kw in rules.items():
            engine.config = engine.config.replace(blend=BlendConfig(**kw))
            pre = engine.prefill(prompt)
            kl, top1 = kl_top1(ref, engine.teacher_forced_logits(pre, answer))
            rows[name].append(dict(top1=top1, kl=kl,
                                   speedup=full_ttft / pre.ttft_s, tokens=len(pre.input_ids),
                                   computed=(pre.stats.recomputed_tokens + pre.stats.fresh_tokens) / len(pre.input_ids)))
        print(f"{q.id}: " + "  ".join(f"{n}={rows[n][-1]['top1']:.2f}/{rows[n][-1]['kl']:.3f}/{rows[n][-1]['speedup']:.1f}x"
                                     for n in rules), flush=True)
    summary = {}
    print(f"\n{'rule':24s} {'top1':>6s} {'KL':>7s} {'speedup':>8s} {'computed':>9s}")
    for name, r in rows.items():
        s = dict(top1=statistics.mean(x["top1"] for x in r), kl=statistics.mean(x["kl"] for x in r),
                 speedup=statistics.median(x["speedup"] for x in r),
                 computed=statistics.mean(x["computed"] for x in r),
                 tokens=statistics.median(x["tokens"] for x in r), n=len(r))
        summary[name] = s
        print(f"{name:24s} {s['top1']:6.3f} {s['kl']:7.4f} {s['speedup']:7.2f}x {s['computed']:9.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
