"""Thin wrapper around ``kvboost-rag bench`` (package :mod:`kvboost_rag_bench`, beside this script).

    python benchmarks/run_bench.py [bench arguments]    # same as `kvboost-rag bench ...`
    python benchmarks/run_bench.py --suite [--out DIR] [--max-queries N] [extra bench arguments]

``--suite`` runs the standard set on the built-in corpus, one after the other, each in a fresh
process so that one run's memory and caches do not affect the next:

1. ``bench_k8.json``      8 documents per prompt, all ratios, plus the TTFT-vs-context sweep
                          (2, 4, 8, 16 documents) and the ratio-curve plot;
2. ``bench_k16.json``     16 documents per prompt, all ratios (no sweep);
3. ``bench_k8_cold.json`` 8 documents, KV fetched from a disk store (``--cold``), full vs 0.15.

Extra arguments (e.g. ``--model``, ``--device cuda``, ``--dtype bfloat16``) go to every run.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

SUITE = [
    ("bench_k8", ["--k", "8"]),
    ("bench_k16", ["--k", "16", "--no-plot"]),
    ("bench_k8_cold", ["--k", "8", "--cold", "--ratios", "0.15", "--no-plot"]),
]


def run_suite(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="run_bench.py --suite", add_help=True)
    p.add_argument("--suite", action="store_true")
    p.add_argument("--out", default="bench_out", help="output folder (default bench_out/)")
    p.add_argument("--max-queries", default=None, help="queries per run (default: all ~20)")
    opts, extra = p.parse_known_args(argv)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    status = 0
    for name, args in SUITE:
        cmd = [sys.executable, "-m", "kvboost_rag_bench", *args, "--json", str(out / f"{name}.json"), *extra]
        if opts.max_queries:
            cmd += ["--max-queries", str(opts.max_queries)]
        print("$ " + " ".join(cmd), flush=True)
        rc = subprocess.call(cmd)
        status = status or rc
    return status


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--suite" in argv:
        return run_suite(argv)
    from kvboost_rag_bench.cli import main as bench_main
    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main())
