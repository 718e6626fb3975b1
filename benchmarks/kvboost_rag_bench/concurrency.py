"""Concurrent requests (issue 14): sequential answers against 2/4/8 at once through the continuous
batching scheduler (:mod:`kvboost_rag.serve.scheduler`). The one implementation behind
``kvboost-rag bench --concurrency 1,2,4,8`` and ``benchmarks/concurrency_bench.py``.

Same process, same prompts (``docs`` retrieved documents each: the built-in pydoc corpus, the
tiny test corpus with ``smoke``, or random tokens with a random-weight model), ``tokens`` new
tokens each, greedy.

* Level 1 runs every prompt twice, interleaved prompt by prompt (order alternating): with
  ``batching=False`` (the caller's thread, the sequential baseline) and through the scheduler,
  so a lone request's overhead shows without drift between the two.
* Level c > 1 submits all prompts from c threads (``engine.generate``, no other user code).
* With ``rounds`` > 1 the whole sequence repeats; each speedup is taken against the sequential
  run of its own round (machines shared with other jobs drift), and the summary is the median.

Per run: output tokens/s, answers/s, TTFT p50/p95 (submission to first token, so queueing under
load counts), per-token latency p50 ((total - TTFT) / (tokens - 1)), the share of wall time spent
in prefills (prefills are part of the work in both modes: sequential runs them between answers,
the scheduler between decode steps), the decode-phase tokens/s (wall minus prefill time), and how
many answers are token-for-token those of the sequential baseline. If ``langchain_kvboost`` is
importable, the same load also runs through ``ChatKVBoost.batch`` and ``abatch``, and with
``llama_index.llms.kvboost``, through ``KVBoostLLM.achat`` (flat prompts, documents found by
detection), at the highest level.
"""
from __future__ import annotations

import asyncio
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

from kvboost_rag_bench import datasets

DEFAULT_LEVELS = (1, 2, 4, 8)


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--concurrency takes comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise ValueError(f"--concurrency levels must be >= 1, got {text!r}")
    return levels


def pct(values, q: float) -> float:
    values = sorted(values)
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


# ------------------------------------------------------------------------------ prompts
def builtin_cases(engine, n_prompts: int, docs: int) -> list[tuple[list[str], str]]:
    """(document texts, question) per prompt from the built-in pydoc corpus; documents warmed."""
    corpus, queries = datasets.builtin_dataset(lambda text: len(engine.tokenize_document(text)))
    by_id = {d.id: d for d in corpus}
    datasets.attach_doc_ids(corpus, queries, docs)
    cases = []
    for query in queries[:n_prompts]:
        texts = [by_id[i].text for i in query.doc_ids[:docs]]
        engine.warm(texts)
        cases.append((texts, query.question))
    return cases


def smoke_cases(engine, n_prompts: int, docs: int) -> list[tuple[list[str], str]]:
    from kvboost_rag.testing.models import DOCS

    engine.warm(DOCS)
    return [([DOCS[(i + j) % len(DOCS)] for j in range(min(docs, len(DOCS)))], f"what is item {i} ?" * (1 + i % 3))
            for i in range(n_prompts)]


def random_cases(engine, n_prompts: int, docs: int, doc_tokens: int, question_tokens: int,
                 seed: int = 0) -> list[tuple[list[str], str]]:
    from kvboost_rag_bench.random_models import random_text, word_count

    rng = random.Random(seed)
    n_words = word_count(engine.tokenizer)
    pool = [random_text(rng, doc_tokens, n_words) for _ in range(max(docs * 2, docs + n_prompts))]
    engine.warm(pool)
    return [([pool[i] for i in rng.sample(range(len(pool)), docs)], random_text(rng, question_tokens, n_words))
            for _ in range(n_prompts)]


# ------------------------------------------------------------------------------ runs
def _sched_stats(engine) -> dict:
    snap = engine.scheduler.snapshot()
    return {k: snap.get(k, 0) for k in ("steps", "row_steps", "prefill_s", "join_s", "step_s", "forward_s")}


def summarize(label: str, results, wall: float, *, prefill_s: float, reference=None,
              extra: Optional[dict] = None) -> dict:
    tokens = sum(r.completion_tokens for r in results)
    ttfts = [r.ttft_s for r in results]
    per_token = [(r.total_s - r.ttft_s) / (r.completion_tokens - 1) for r in results if r.completion_tokens > 1]
    row = {"mode": label, "answers": len(results), "output_tokens": tokens, "wall_s": round(wall, 3),
           "tokens_per_s": round(tokens / wall, 2), "answers_per_s": round(len(results) / wall, 3),
           "ttft_p50_s": round(pct(ttfts, 0.5), 3), "ttft_p95_s": round(pct(ttfts, 0.95), 3),
           "per_token_p50_ms": round(1000 * pct(per_token, 0.5), 1),
           "prefill_share": round(prefill_s / wall, 3),
           "decode_tokens_per_s": round(tokens / max(wall - prefill_s, 1e-9), 2)}
    if reference is not None:
        row["same_as_sequential"] = sum(r.token_ids == ref.token_ids for r, ref in zip(results, reference))
    row.update(extra or {})
    return row


def format_row(row: dict) -> str:
    text = (f"{row['mode']:>26}  {int(row['output_tokens']):5d} tok  {row['wall_s']:7.2f} s  "
            f"{row['tokens_per_s']:7.2f} tok/s  {row['answers_per_s']:6.3f} ans/s")
    if "ttft_p50_s" in row:
        text += (f"  TTFT p50 {row['ttft_p50_s']:.3f} s p95 {row['ttft_p95_s']:.3f} s  per-token p50 "
                 f"{row['per_token_p50_ms']:.1f} ms  prefill {100 * row['prefill_share']:.0f}% of wall  "
                 f"decode {row['decode_tokens_per_s']:.2f} tok/s")
    if "same_as_sequential" in row:
        text += f"  same answers {row['same_as_sequential']:g}/{row['answers']:g}"
    if "speedup_vs_sequential" in row:
        text += f"  {row['speedup_vs_sequential']:.2f}x"
    return text


def run_sequential_pair(engine, prompts, tokens: int, reference=None):
    """Each prompt with batching off and through the scheduler, back to back (order alternating)."""
    walls = {False: 0.0, True: 0.0}
    results: dict[bool, list] = {False: [], True: []}
    before = _sched_stats(engine)
    for i, p in enumerate(prompts):
        for batching in ((False, True) if i % 2 == 0 else (True, False)):
            engine.config = engine.config.replace(batching=batching)
            t0 = time.perf_counter()
            results[batching].append(engine.generate(p, max_new_tokens=tokens))
            walls[batching] += time.perf_counter() - t0
    after = _sched_stats(engine)
    ref = reference if reference is not None else results[False]
    off = summarize("sequential (batching off)", results[False], walls[False],
                    prefill_s=sum(r.ttft_s for r in results[False]), reference=ref)
    on = summarize("sequential (scheduler)", results[True], walls[True],
                   prefill_s=after["prefill_s"] - before["prefill_s"], reference=ref)
    return off, on, results[False]


def run_threads(engine, prompts, tokens: int, concurrency: int, reference=None) -> dict:
    engine.config = engine.config.replace(batching=True)
    before = _sched_stats(engine)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda p: engine.generate(p, max_new_tokens=tokens), prompts))
    wall = time.perf_counter() - t0
    after = _sched_stats(engine)
    delta = {k: round(after[k] - before[k], 3) for k in after}
    snap = engine.scheduler.snapshot()
    return summarize(f"{concurrency} concurrent threads", results, wall, prefill_s=delta["prefill_s"],
                     reference=reference,
                     extra={"scheduler": {**delta, "max_batch_seen": snap.get("max_batch_seen", 0)}})


def _framework_row(label: str, tokens_out: int, answers: int, wall: float) -> dict:
    return {"mode": label, "answers": answers, "output_tokens": tokens_out, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens_out / wall, 2), "answers_per_s": round(answers / wall, 3)}


def run_langchain(engine, cases, tokens: int, concurrency: int, system_prompt: str) -> list[dict]:
    """The same load through ``ChatKVBoost.batch`` (LangChain's thread pool) and ``abatch``
    (asyncio), flat prompts with the documents pasted in (found by detection), as a chain sends them."""
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_kvboost import ChatKVBoost

    engine.config = engine.config.replace(batching=True)
    chat = ChatKVBoost(engine=engine, max_tokens=tokens)
    inputs = [[SystemMessage(system_prompt),
               HumanMessage("Documents:\n\n" + "\n\n".join(texts) + f"\n\nQuestion: {question}")]
              for texts, question in cases]
    config = {"max_concurrency": concurrency}
    rows = []
    for label, call in ((f"langchain batch x{concurrency}", lambda: chat.batch(inputs, config=config)),
                        (f"langchain abatch x{concurrency}", lambda: asyncio.run(chat.abatch(inputs, config=config)))):
        t0 = time.perf_counter()
        outs = call()
        wall = time.perf_counter() - t0
        tokens_out = sum((o.usage_metadata or {}).get("output_tokens", 0) for o in outs)
        rows.append(_framework_row(label, tokens_out, len(outs), wall))
    return rows


def run_llama_index(engine, cases, tokens: int, concurrency: int, system_prompt: str) -> list[dict]:
    """The same load through LlamaIndex ``KVBoostLLM.achat``, ``concurrency`` at once (asyncio)."""
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.kvboost import KVBoostLLM

    engine.config = engine.config.replace(batching=True)
    llm = KVBoostLLM(engine=engine, max_new_tokens=tokens)
    inputs = [[ChatMessage(role="system", content=system_prompt),
               ChatMessage(role="user", content="Documents:\n\n" + "\n\n".join(texts) + f"\n\nQuestion: {question}")]
              for texts, question in cases]

    async def main():
        gate = asyncio.Semaphore(concurrency)

        async def one(messages):
            async with gate:
                return await llm.achat(messages)
        return await asyncio.gather(*(one(m) for m in inputs))

    t0 = time.perf_counter()
    outs = asyncio.run(main())
    wall = time.perf_counter() - t0
    tokens_out = sum(int(o.additional_kwargs.get("completion_tokens", 0)) for o in outs)  # the answer's telemetry
    return [_framework_row(f"llama-index achat x{concurrency}", tokens_out, len(outs), wall)]


def run_levels(engine, cases, levels: Sequence[int], tokens: int, *, rounds: int = 1, langchain: bool = True,
               log: Callable[[str], None] = print) -> dict:
    """Run every level ``rounds`` times; returns the rows and a per-level summary (medians)."""
    from kvboost_rag_bench.runner import SYSTEM_PROMPT, build_prompt

    prompts = [build_prompt(engine, texts, question) for texts, question in cases]
    engine.config = engine.config.replace(batching=True)
    engine.generate(prompts[0], max_new_tokens=4)  # warm-up (allocator, kernels, the scheduler thread)
    lengths = [engine.count_tokens(p) for p in prompts]
    log(f"{len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens, {tokens} new tokens each, "
        f"dtype {str(engine.model.dtype).removeprefix('torch.')}, {_threads()} threads")
    rows: list[dict] = []
    reference = None
    for rnd in range(rounds):
        baseline = None
        seq_levels = [c for c in levels if c <= 1] or [1]
        order = sorted(set(seq_levels[:1] + [c for c in levels if c > 1]))
        for c in order:
            if c <= 1:
                off, on, results = run_sequential_pair(engine, prompts, tokens, reference)
                reference = reference if reference is not None else results
                baseline = off["tokens_per_s"]
                new = [off, on]
            else:
                new = [run_threads(engine, prompts, tokens, c, reference)]
            for row in new:
                row["round"], row["concurrency"] = rnd, max(c, 1)
                if baseline and row["mode"] != "sequential (batching off)":
                    row["speedup_vs_sequential"] = round(row["tokens_per_s"] / baseline, 2)
                log(format_row(row))
            rows.extend(new)
    if langchain:
        base = [r["tokens_per_s"] for r in rows if r["mode"] == "sequential (batching off)"]
        for module, runner in (("langchain_kvboost", run_langchain), ("llama_index.llms.kvboost", run_llama_index)):
            try:
                __import__(module)
            except ImportError:
                log(f"{module} not importable: its run is skipped")
                continue
            for row in runner(engine, cases, tokens, max(levels), SYSTEM_PROMPT):
                if base:
                    row["speedup_vs_sequential"] = round(row["tokens_per_s"] / statistics.median(base), 2)
                log(format_row(row))
                rows.append(row)
    return {"prompt_tokens": lengths, "new_tokens": tokens, "rounds": rounds, "rows": rows,
            "summary": summarize_rounds(rows)}


def summarize_rounds(rows: list[dict]) -> list[dict]:
    """Median over rounds of each mode's figures."""
    out = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        keys = [k for k, v in mine[0].items() if isinstance(v, (int, float)) and k not in ("round",)]
        out.append({"mode": mode, "runs": len(mine),
                    **{k: round(statistics.median(r[k] for r in mine if k in r), 3) for k in keys}})
    return out


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# ------------------------------------------------------------------------------ entry points
def run_concurrency(args, *, engine=None, log: Callable[[str], None] = print) -> dict:
    """``kvboost-rag bench --concurrency LEVELS``: the engine from ``--model/--dtype/--device`` (or
    ``--random-weights``), ``--max-queries`` prompts (default 8) of ``--k`` documents, and
    ``--concurrency-tokens`` new tokens each."""
    levels = parse_levels(args.concurrency)
    n_prompts = args.max_queries or 8
    if engine is None:
        engine = _engine(args)
    if getattr(args, "random_weights", None):
        cases = random_cases(engine, n_prompts, args.k, args.doc_tokens, args.question_tokens, args.seed)
    else:
        cases = builtin_cases(engine, n_prompts, args.k)
    result = run_levels(engine, cases, levels, args.concurrency_tokens, rounds=args.concurrency_rounds,
                        langchain=not args.no_langchain, log=log)
    result.update(levels=levels, model=getattr(engine, "model_name", None), docs_per_prompt=args.k)
    return result


def _engine(args):
    from kvboost_rag import KVBoostEngine

    if getattr(args, "random_weights", None):
        from kvboost_rag_bench.random_models import MAX_WORD_VOCAB, build_random_model, load_random_config, resolve_device
        from kvboost_rag.testing.models import word_tokenizer

        config = load_random_config(args.random_weights)
        model = build_random_model(config, device=resolve_device(args.device), dtype=args.dtype, seed=args.seed)
        return KVBoostEngine(model, word_tokenizer(min(int(config.vocab_size), MAX_WORD_VOCAB)), write_behind=False,
                             model_name=f"random:{args.random_weights}")
    kw = {"device": args.device, "write_behind": False}
    if args.dtype:
        kw["dtype"] = args.dtype
    return KVBoostEngine.from_pretrained(args.model, **kw)


def format_summary(result: dict) -> str:
    lines = [f"concurrency bench: {len(result['prompt_tokens'])} prompts of {min(result['prompt_tokens'])}-"
             f"{max(result['prompt_tokens'])} tokens, {result['new_tokens']} new tokens each, "
             f"median of {result['rounds']} round(s)"]
    lines += [format_row(r) for r in result["summary"]]
    return "\n".join(lines)
