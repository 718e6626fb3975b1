"""Concurrent requests: sequential answers against 2/4/8 at once (continuous batching).

    python benchmarks/concurrency_bench.py [--concurrency 1,2,4,8] [--prompts 8] [--tokens 128]
                                           [--docs 8] [--rounds 1] [--dtype auto] [--smoke]
                                           [--no-langchain] [--json OUT.json]

The same runs as ``kvboost-rag bench --concurrency 1,2,4,8`` (the implementation lives in
:mod:`kvboost_rag_bench.concurrency`, which documents what is measured): the built-in pydoc corpus
with the default model (``--smoke``: the tiny random-weight model and corpus of the tests),
``--docs`` retrieved documents per prompt, ``--tokens`` new tokens each; level 1 is the sequential
baseline (batching off) interleaved with the same prompts through the scheduler.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvboost_rag_bench import concurrency  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,2,4,8", help="comma-separated (1 = sequential)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per run (default 8)")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per answer (default 128)")
    p.add_argument("--docs", type=int, default=8, help="retrieved documents per prompt (default 8)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole sequence; medians reported (default 1)")
    p.add_argument("--dtype", default=None, help="model dtype (default: the engine's choice, bf16 on AMX CPUs)")
    p.add_argument("--smoke", action="store_true", help="tiny random-weight model and corpus (seconds)")
    p.add_argument("--no-langchain", action="store_true", help="skip the ChatKVBoost.abatch run")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    levels = concurrency.parse_levels(args.concurrency)
    if args.smoke:
        from kvboost_rag.testing.models import tiny_engine
        engine = tiny_engine(write_behind=False)
        cases = concurrency.smoke_cases(engine, args.prompts, args.docs)
    else:
        from kvboost_rag import KVBoostEngine
        engine = KVBoostEngine.from_pretrained(None, dtype=args.dtype, write_behind=False)
        cases = concurrency.builtin_cases(engine, args.prompts, args.docs)
    result = concurrency.run_levels(engine, cases, levels, args.tokens, rounds=args.rounds,
                                    langchain=not args.no_langchain)
    if args.rounds > 1:
        print(concurrency.format_summary(result))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **result}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
