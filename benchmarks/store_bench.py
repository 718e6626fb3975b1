"""Index-time and store figures on the real model (issue targets of the warm job and store).

Measured in one process:
1. warm throughput: ``warm_corpus`` into a fresh disk store vs a plain batched forward of the
   same documents (same batch size, same length-sorted batches), tokens/s and their ratio;
2. fetch cost: reading an 8-document prompt's KV from the disk tier (a new store object, OS page
   cache dropped when permitted) vs that prompt's full prefill, and the whole TTFT with cold KV
   next to the same prompt's TTFT with its KV already in memory;
3. bytes per entry at 16 (as stored by the model dtype), 8 and 4 bits.

    python benchmarks/store_bench.py --json bench_out/store.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
import warnings

import torch

from kvboost_rag import KVBoostEngine, warm_corpus
from kvboost_rag.store.disk import DiskStore
from kvboost_rag.store.memory import MemoryStore
from kvboost_rag_bench.datasets import builtin_dataset
from kvboost_rag_bench.runner import build_prompt


def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def plain_batched_forward(engine, texts, batch_size) -> tuple[int, float]:
    """Tokens/s of a bare batched forward (preamble + document, right-padded), nothing stored."""
    ids = sorted((engine.preamble_ids + engine.tokenize_document(t) for t in texts), key=len)
    tokens, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(ids), batch_size):
            batch = ids[b: b + batch_size]
            width = max(map(len, batch))
            x = torch.zeros((len(batch), width), dtype=torch.long)
            for i, row in enumerate(batch):
                x[i, : len(row)] = torch.tensor(row)
            engine.model(input_ids=x, use_cache=True, logits_to_keep=1)
            tokens += sum(len(r) - len(engine.preamble_ids) for r in batch)
    return tokens, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--docs", type=int, default=8, help="documents per prompt for the fetch measurement")
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    engine = KVBoostEngine.from_pretrained()
    docs, _ = builtin_dataset(lambda t: len(engine.tokenize_document(t)))
    texts = [d.text for d in docs]
    out: dict = {"documents": len(texts)}

    # 1. warm throughput vs a plain batched forward (interleaved: plain, warm, plain)
    plain_runs = []
    tokens, seconds = plain_batched_forward(engine, texts, args.batch_size)
    plain_runs.append(tokens / seconds)
    root = tempfile.mkdtemp(prefix="kvb-store-")
    store = DiskStore(root)
    report = warm_corpus(texts, engine, store, batch_size=args.batch_size, progress=False, register=False)
    tokens, seconds = plain_batched_forward(engine, texts, args.batch_size)
    plain_runs.append(tokens / seconds)
    plain = statistics.mean(plain_runs)
    out["warm"] = {"warm_tokens_per_s": report.tokens_per_s, "plain_forward_tokens_per_s": plain,
                   "ratio": report.tokens_per_s / plain, "tokens": report.tokens, "bytes": report.bytes_written}
    print(f"warm: {report.tokens_per_s:.0f} tok/s vs plain batched forward {plain:.0f} tok/s "
          f"-> {report.tokens_per_s / plain:.2f}", flush=True)

    # 2. fetch from disk vs full prefill, and cold TTFT
    rng = random.Random(0)
    engine.store = DiskStore(root)
    rows = []
    for _ in range(args.prompts):
        chosen = rng.sample(texts, args.docs)
        prompt = build_prompt(engine, chosen, "What does this say?")
        full = engine.prefill(prompt, strategy="full").ttft_s
        keys = [engine.key_for_text(t) for t in chosen]
        dropped = drop_page_cache()
        cold_store = DiskStore(root)
        t0 = time.perf_counter()
        chunks = [cold_store.get(k, engine.fingerprint) for k in keys]
        fetch = time.perf_counter() - t0
        assert all(c is not None for c in chunks)
        drop_page_cache()
        engine.store = DiskStore(root)
        cold = engine.prefill(prompt, recompute_ratio=0.15)
        engine.store = MemoryStore(None)
        for k, c in zip(keys, chunks):
            engine.store.put(k, c)
        warm = engine.prefill(prompt, recompute_ratio=0.15)
        rows.append(dict(tokens=len(cold.input_ids), full_s=full, fetch_s=fetch, fetch_vs_full=fetch / full,
                         cold_ttft_s=cold.ttft_s, cold_speedup=full / cold.ttft_s, memory_ttft_s=warm.ttft_s,
                         memory_speedup=full / warm.ttft_s, page_cache_dropped=dropped))
        print(f"{rows[-1]['tokens']} tokens: full {full:.3f}s, disk fetch {fetch:.3f}s ({fetch / full:.1%}), "
              f"cacheblend@0.15 TTFT cold {cold.ttft_s:.3f}s ({full / cold.ttft_s:.2f}x), "
              f"from memory {warm.ttft_s:.3f}s ({full / warm.ttft_s:.2f}x)", flush=True)
    out["fetch"] = {k: statistics.median(r[k] for r in rows) for k in ("tokens", "full_s", "fetch_s", "fetch_vs_full",
                                                                         "cold_ttft_s", "cold_speedup", "memory_ttft_s",
                                                                         "memory_speedup")}
    out["fetch"]["page_cache_dropped"] = rows[0]["page_cache_dropped"]

    # 3. bytes per entry by kv_bits
    sizes = {}
    chunk = engine.encode_batch(texts[:1])[0]
    for bits in (16, 8, 4):
        d = DiskStore(tempfile.mkdtemp(prefix=f"kvb-{bits}-"), kv_bits=bits)
        sizes[bits] = d.put("k" * 64, chunk)
    out["bytes_per_entry"] = {"tokens": chunk.num_tokens, "dtype": str(chunk.keys.dtype), **{str(b): s for b, s in sizes.items()}}
    print(f"entry of {chunk.num_tokens} tokens ({chunk.keys.dtype}): " + ", ".join(f"{b}-bit {s / 1e6:.2f} MB" for b, s in sizes.items()))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
