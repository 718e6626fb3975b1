"""Many small documents in one store: warm time, engine start-up time over the store, resident
memory, and what start-up reads (entry headers only, never tensors).

    .venv/bin/python benchmarks/store_scale_bench.py --docs 10000            # ~2-3 min on 2 cores, ~1.1 GB
    .venv/bin/python benchmarks/store_scale_bench.py --docs 10000 --store DIR --keep

Tiny random-weight Llama (4 layers, 2 KV heads, head_dim 16: about 1 KB of KV per token), so the
store's size and file count, not the model, dominate. Start-up is measured in a fresh process
(``KVBoostEngine(model, tokenizer, store=open_store(DIR))``), then one flat prompt holding two
warmed documents. Results as one JSON line per phase.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def warm(n: int, root: str, batch_size: int) -> dict:
    from kvboost_rag.store.tiered import open_store
    from kvboost_rag.testing.models import tiny_engine
    from kvboost_rag.testing.store import make_docs

    docs = make_docs(n, seed=0, min_words=10, max_words=30)
    engine = tiny_engine("llama", store=open_store(root), write_behind=False)
    t = time.perf_counter()
    report = engine.warm(docs, batch_size=batch_size)
    return {"phase": "warm", "documents": n, "seconds": round(time.perf_counter() - t, 1), "encoded": report.encoded,
            "tokens": report.tokens, "bytes": report.bytes_written}


def start(n: int, root: str) -> dict:
    from kvboost_rag import KVBoostEngine
    from kvboost_rag.store import disk, safe_files
    from kvboost_rag.store.tiered import open_store
    from kvboost_rag.testing.models import tiny_model, tiny_tokenizer
    from kvboost_rag.testing.store import make_docs

    model, tok = tiny_model("llama", vocab_size=400), tiny_tokenizer()
    reads = {"headers": 0, "whole_entries": 0}
    real = safe_files._read_entry

    def counting(path, *, whole):
        reads["whole_entries" if whole else "headers"] += 1
        return real(path, whole=whole)

    disk._read_entry = counting
    before = _rss_mb()
    t = time.perf_counter()
    engine = KVBoostEngine(model, tok, store=open_store(root), write_behind=False)
    startup = time.perf_counter() - t
    after = _rss_mb()
    at_startup = dict(reads)
    docs = make_docs(n, seed=0, min_words=10, max_words=30)
    t = time.perf_counter()
    result = engine.generate("Context:\n" + docs[n // 3] + "\n" + docs[(2 * n) // 3] + "\nQ: what?", max_new_tokens=1)
    return {"phase": "start", "documents": n, "startup_seconds": round(startup, 2), "startup_reads": at_startup,
            "rss_mb_before_engine": round(before), "rss_mb_after_engine": round(after),
            "detector_texts": len(engine.detector), "first_prompt_seconds": round(time.perf_counter() - t, 3),
            "first_prompt_documents_reused": result.extra["documents_reused"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="store_scale_bench.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=10000, metavar="N", help="documents (default: 10000)")
    ap.add_argument("--store", default=None, metavar="DIR", help="store directory (default: a temp dir)")
    ap.add_argument("--batch-size", type=int, default=32, metavar="N", help="warm batch size (default: 32)")
    ap.add_argument("--keep", action="store_true", help="keep the store afterwards")
    ap.add_argument("--phase", choices=("all", "warm", "start"), default="all", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.phase != "all":
        print(json.dumps(warm(args.docs, args.store, args.batch_size) if args.phase == "warm"
                         else start(args.docs, args.store)))
        return 0
    root = args.store or tempfile.mkdtemp(prefix="kvb-scale-")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "TQDM_DISABLE": "1"}
    try:
        for phase in ("warm", "start"):  # each in a fresh process: start-up and memory as a new server sees them
            proc = subprocess.run([sys.executable, __file__, "--phase", phase, "--docs", str(args.docs), "--store", root,
                                   "--batch-size", str(args.batch_size)], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            print(proc.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep and args.store is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
