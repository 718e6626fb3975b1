"""Decode throughput with the in-place KV cache against transformers' ``torch.cat`` growth.

    python benchmarks/decode_bench.py [--docs 8,16] [--prompts 3] [--tokens 64]

For each document count, builds the first prompts of the built-in corpus (retrieved documents,
retrieval order), warms them, and generates ``--tokens`` tokens per prompt with both caches,
interleaved in this one process (cat, in-place, cat, in-place). Decode throughput is
``completion_tokens / (total_s - ttft_s)`` from the engine's own telemetry. The "cat" runs swap
:func:`kvboost_rag.kv.decode_cache.with_room` for a no-op, which leaves transformers'
``DynamicCache`` as it is.
"""
from __future__ import annotations

import argparse
import statistics

from kvboost_rag import KVBoostEngine
from kvboost_rag.decode import loop as generate_module
from kvboost_rag_bench.concurrency import builtin_cases
from kvboost_rag_bench.runner import build_prompt


def prompts_for(engine: KVBoostEngine, k: int, n: int) -> list:
    return [build_prompt(engine, texts, question) for texts, question in builtin_cases(engine, n, k)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", default="8,16", help="documents per prompt, comma-separated")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per answer")
    args = p.parse_args()
    engine = KVBoostEngine.from_pretrained()
    in_place = generate_module.with_room
    for k in [int(x) for x in args.docs.split(",")]:
        rates: dict[str, list[float]] = {"cat": [], "in-place": []}
        for prompt in prompts_for(engine, k, args.prompts):
            engine.generate(prompt, max_new_tokens=2)  # warm-up
            for mode in ("cat", "in-place", "cat", "in-place"):
                generate_module.with_room = in_place if mode == "in-place" else (lambda cache, room: cache)
                try:
                    result = engine.generate(prompt, max_new_tokens=args.tokens)
                finally:
                    generate_module.with_room = in_place
                rates[mode].append(result.completion_tokens / max(result.total_s - result.ttft_s, 1e-9))
        cat, fast = statistics.median(rates["cat"]), statistics.median(rates["in-place"])
        print(f"{k:>2} documents: decode {fast:.1f} tokens/s in place vs {cat:.1f} with torch.cat "
              f"({fast / cat:.2f}x; medians of {len(rates['cat'])} answers each)", flush=True)


if __name__ == "__main__":
    main()
