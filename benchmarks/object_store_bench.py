"""Object-store figures on the real model: an S3 API server (moto) on 127.0.0.1, SmolLM2.

Measured:
1. warm throughput: ``warm_corpus`` of the built-in corpus into ``s3://`` vs into a local disk store
   (same engine, same batches, context off so only the store differs), tokens/s;
2. fetch: an 8-document prompt's KV read through ``open_store("s3://...")`` with an empty local
   cache (object store -> verify -> local cache -> memory), then by a new store object on that
   cache (local disk tier), each against the same prompt's full-prefill TTFT; and cacheblend@0.15
   TTFT with the KV cold in the object store;
3. a second process opens ``KVBoostEngine.from_pretrained(store="s3://...")`` and answers prompts
   greedily: documents reused, and answers compared with this process's local-disk store's;
4. faults: a writer process killed with SIGKILL at random moments and the S3 server stopped and
   restarted under it; then every entry the writer reported written must be served intact and
   ``verify()`` find nothing (0 lost, 0 corrupt).

The server for 1-3 runs in its own process (its CPU time is not the client's); for 4 it runs in
this process, so its buckets survive a restart.

    python benchmarks/object_store_bench.py --json bench_out/object_store.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings

# The S3 server process; it exits once the bench that started it is gone (even after a kill -9).
SERVER = textwrap.dedent("""
    import os, sys, time
    from moto.server import ThreadedMotoServer
    parent = os.getppid()
    ThreadedMotoServer("127.0.0.1", int(sys.argv[1]), verbose=False).start()
    print("ready", flush=True)
    while os.getppid() == parent:
        time.sleep(1)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def aws_env(port: int) -> dict:
    return {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}


def make_bucket(port: int, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                 aws_access_key_id="bench", aws_secret_access_key="bench").create_bucket(Bucket=name)


SECOND_PROCESS = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("ignore")
    from kvboost_rag import KVBoostEngine
    from kvboost_rag_bench.runner import build_prompt
    engine = KVBoostEngine.from_pretrained(store=sys.argv[1])
    out = []
    for chosen in json.loads(sys.stdin.read()):
        r = engine.generate(build_prompt(engine, chosen, "What does this say?"), max_new_tokens=16, temperature=0.0)
        out.append({"text": r.text, "reused": r.extra["documents_reused"], "documents": r.extra["documents"],
                    "ttft_s": r.ttft_s})
    print(json.dumps(out))
""")

WRITER = textwrap.dedent("""
    import sys
    from kvboost_rag.errors import StoreError
    from kvboost_rag.store.object_store import ObjectStore
    from kvboost_rag.testing.store import synthetic_chunk
    store = ObjectStore(sys.argv[1], connect_timeout_s=1, timeout_s=5, retries=2, retry_budget_s=3, cooldown_s=0.2)
    i = int(sys.argv[2])
    while True:
        key = f"{i:06d}" + "k" * 58
        try:
            store.put(key, synthetic_chunk(64, "fault-fp", seed=i, text=str(i)))
            print("ok", i, flush=True)
        except StoreError:
            print("failed", i, flush=True)
        i += 1
""")


def fault_campaign(rounds: int, seed: int) -> dict:
    """SIGKILL a writer at random moments, restart the server under it; count lost and corrupt."""
    import torch
    from moto.server import ThreadedMotoServer

    from kvboost_rag.store.object_store import ObjectStore
    from kvboost_rag.testing.store import synthetic_chunk

    rng = random.Random(seed)
    port = free_port()
    server = ThreadedMotoServer("127.0.0.1", port, verbose=False)
    server.start()
    os.environ.update(aws_env(port))
    make_bucket(port, "faults")
    url = "s3://faults/kv"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                         os.environ.get("PYTHONPATH", "")])}
    written, failed, restarts, start = set(), 0, 0, 0
    for r in range(rounds):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, url, str(start)], env=env, stdout=subprocess.PIPE,
                                text=True)
        time.sleep(rng.uniform(4.0, 6.0))  # includes the writer's start-up (torch import)
        if r % 2 == 1:  # restart the server under the running writer
            server.stop()
            time.sleep(rng.uniform(1.5, 4.0))  # longer than a write's retries: some writes fail
            server = ThreadedMotoServer("127.0.0.1", port, verbose=False)
            server.start()
            restarts += 1
            time.sleep(rng.uniform(0.5, 1.5))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        for line in out.splitlines():
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                continue  # a line cut by the kill
            status, i = parts
            if status == "ok":
                written.add(int(i))
            else:
                failed += 1
        start = max(written | {start}) + 1000
    store = ObjectStore(url)
    lost = corrupt = 0
    for i in sorted(written):
        got = store.get(f"{i:06d}" + "k" * 58, "fault-fp")
        if got is None:
            lost += 1
        elif not torch.equal(got.keys, synthetic_chunk(64, "fault-fp", seed=i, text=str(i)).keys):
            corrupt += 1
    bad = store.verify()
    objects = len(store)
    server.stop()
    return {"kills": rounds, "server_restarts": restarts, "entries_reported_written": len(written),
            "writes_failed_during_outages": failed, "objects": objects,
            "lost": lost, "corrupt_served": corrupt, "verify_bad": len(bad)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--docs", type=int, default=8, help="documents per prompt for the fetch measurement")
    ap.add_argument("--prompts", type=int, default=5, help="prompts for the fetch and second-process checks")
    ap.add_argument("--kills", type=int, default=6, help="writer kills in the fault campaign (0: skip it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    out: dict = {"date": time.strftime("%Y-%m-%d"), "cpu": _cpu()}

    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        os.environ.update(aws_env(port))
        make_bucket(port, "bench")
        out.update(_model_figures(args, port))
    finally:
        server.kill()
        server.wait()
    if args.kills:
        out["faults"] = fault_campaign(args.kills, args.seed)
        print(f"faults: {out['faults']}", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        return "?"


def _model_figures(args, port: int) -> dict:
    from kvboost_rag import KVBoostEngine, warm_corpus
    from kvboost_rag.store.disk import DiskStore
    from kvboost_rag.store.tiered import open_store
    from kvboost_rag_bench.datasets import builtin_dataset
    from kvboost_rag_bench.runner import build_prompt

    out: dict = {}
    engine = KVBoostEngine.from_pretrained()
    docs, _ = builtin_dataset(lambda t: len(engine.tokenize_document(t)))
    texts = [d.text for d in docs]
    tmp = tempfile.mkdtemp(prefix="kvb-objbench-")
    url = "s3://bench/kv"

    # 1. warm throughput: local disk, then s3 (fresh stores, context off: only the store differs)
    disk_root = os.path.join(tmp, "disk")
    disk = warm_corpus(texts, engine, DiskStore(disk_root), batch_size=args.batch_size, progress=False,
                       register=False, context="none")
    s3 = warm_corpus(texts, engine, open_store(url, cache_dir=os.path.join(tmp, "warm-cache")),
                     batch_size=args.batch_size, progress=False, register=False, context="none")
    assert not disk.failed and not s3.failed and s3.encoded == disk.encoded
    out["warm"] = {"documents": s3.encoded, "tokens": s3.tokens, "bytes": s3.bytes_written,
                   "disk_tokens_per_s": disk.tokens_per_s, "s3_tokens_per_s": s3.tokens_per_s,
                   "ratio": s3.tokens_per_s / disk.tokens_per_s}
    print(f"warm: s3 {s3.tokens_per_s:.0f} tok/s vs local disk {disk.tokens_per_s:.0f} tok/s "
          f"-> {out['warm']['ratio']:.2f} ({s3.encoded} documents, {s3.bytes_written / 1e6:.0f} MB)", flush=True)

    # 2. fetch: object store (empty local cache) and local tier, vs full prefill
    rng = random.Random(args.seed)
    prompts = [rng.sample(texts, args.docs) for _ in range(args.prompts)]
    rows = []
    for n, chosen in enumerate(prompts):
        prompt = build_prompt(engine, chosen, "What does this say?")
        engine.store = DiskStore(disk_root)
        full = engine.prefill(prompt, strategy="full").ttft_s
        keys = [engine.key_for_text(t) for t in chosen]
        cache = os.path.join(tmp, f"cache-{n}")
        remote_only = open_store(url, cache_dir=os.path.join(tmp, f"probe-{n}")).remote
        t0 = time.perf_counter()
        got = [remote_only.fetch(k, engine.fingerprint)[0] for k in keys]
        download = time.perf_counter() - t0
        first = open_store(url, cache_dir=cache)
        t0 = time.perf_counter()
        got = [first.get(k, engine.fingerprint) for k in keys]
        first_s = time.perf_counter() - t0
        first.flush()  # the local cache is written in the background
        cached_s = time.perf_counter() - t0
        assert all(c is not None for c in got)
        local = open_store(url, cache_dir=cache)
        t0 = time.perf_counter()
        got = [local.get(k, engine.fingerprint) for k in keys]
        local_s = time.perf_counter() - t0
        assert all(c is not None for c in got) and local.remote.hits == 0
        engine.store = open_store(url, cache_dir=os.path.join(tmp, f"ttft-{n}"))
        cold = engine.prefill(prompt, recompute_ratio=0.15).ttft_s
        warm_mem = engine.prefill(prompt, recompute_ratio=0.15).ttft_s
        nbytes = sum(os.path.getsize(first.disk.path_for(k)) for k in keys)
        rows.append(dict(tokens=len(engine.tokenize(prompt)), mb=nbytes / 1e6, full_s=full,
                         object_fetch_only_s=download, first_fetch_s=first_s, first_vs_full=first_s / full,
                         first_fetch_until_cached_s=cached_s,
                         local_tier_fetch_s=local_s, local_vs_full=local_s / full, s3_cold_ttft_s=cold,
                         s3_cold_speedup=full / cold, memory_ttft_s=warm_mem))
        print(f"{rows[-1]['tokens']} tokens, {nbytes / 1e6:.0f} MB: full {full:.3f}s | first fetch (s3 tier) "
              f"{first_s:.3f}s ({first_s / full:.1%}), local cache written after {cached_s:.3f}s | local tier "
              f"{local_s:.3f}s ({local_s / full:.1%}) | cacheblend@0.15 TTFT cold in s3 {cold:.3f}s "
              f"({full / cold:.2f}x), from memory {warm_mem:.3f}s", flush=True)
    out["fetch"] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    out["fetch_rows"] = rows

    # 3. a second process serves from s3: reuse and answers vs a local-disk store
    engine.store = DiskStore(disk_root)
    local_answers = [engine.generate(build_prompt(engine, c, "What does this say?"), max_new_tokens=16,
                                     temperature=0.0) for c in prompts]
    env = {**os.environ, "KVBOOST_RAG_HOME": os.path.join(tmp, "home"), "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", SECOND_PROCESS, url], input=json.dumps(prompts), env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    remote = json.loads(proc.stdout.strip().splitlines()[-1])
    reused = sum(r["reused"] for r in remote)
    total = sum(r["documents"] for r in remote)
    same = sum(r["text"] == a.text for r, a in zip(remote, local_answers))
    out["second_process"] = {"prompts": len(prompts), "documents": total, "reused": reused,
                             "answers_identical_to_disk": same,
                             "local_disk_reused": sum(a.extra["documents_reused"] for a in local_answers)}
    print(f"second process from s3: {reused}/{total} documents reused, {same}/{len(prompts)} answers identical "
          "to the local-disk store's", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
