"""The ``kvboost-rag`` subcommands behind :mod:`kvboost_rag.app.cli`'s parser: ``warm``, ``inspect``
and ``ask``. Each imports what it needs (torch, the engine, the store) when it runs, so the CLI's
``--help`` stays fast."""
from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from typing import List, Optional

PROG = "kvboost-rag"


def _disk_store(args, kv_bits: Optional[int] = None, max_bytes: Optional[int] = None):
    """The --store directory's DiskStore, or for a URL the object store behind its local tiers."""
    from kvboost_rag.store.object_store import is_store_url

    if is_store_url(args.store):
        from kvboost_rag.store.tiered import open_store

        return open_store(args.store, kv_bits=kv_bits, max_bytes=max_bytes)
    from kvboost_rag.store.disk import DiskStore

    return DiskStore(args.store, kv_bits=kv_bits, max_bytes=max_bytes)


def _store_name(store) -> str:
    return str(getattr(store, "url", None) or store.root)


def context_from_args(args):
    """``--context`` (when the parser has it) and the settings of
    :func:`kvboost_rag.app.cli.add_context_args` as ``warm_corpus``'s ``context``."""
    if getattr(args, "context", "auto") == "none":
        return None
    from kvboost_rag.index.context import ContextConfig

    return ContextConfig(neighbours=args.context_docs, max_tokens=args.context_tokens, order=args.context_order,
                         neighbour_kv=args.context_kv)


def cmd_warm(args) -> int:
    from kvboost_rag.app.warm import warm_corpus

    if not os.path.exists(os.path.expanduser(args.corpus)):  # fail before spending time loading a model
        print(f"{PROG} warm: error: corpus path {args.corpus!r} does not exist", file=sys.stderr)
        return 1
    from kvboost_rag.index.sources import iter_documents

    if next(iter(iter_documents(args.corpus)), None) is None:  # before loading a model for nothing
        _warn_empty_corpus(args.corpus)
        return 1
    store = _disk_store(args, args.kv_bits, args.max_bytes)
    engine_kwargs = {"device": args.device, "dtype": args.dtype}
    print(f"store: {_store_name(store)} (kv_bits={store.kv_bits})", file=sys.stderr)
    if args.backend == "ray":
        model = args.model  # each actor loads it (None: the default model)
    else:
        from kvboost_rag.engine import KVBoostEngine

        model = KVBoostEngine.from_pretrained(args.model, store=store, **engine_kwargs)
        engine_kwargs = {}
    try:
        report = warm_corpus(args.corpus, model, store, batch_size=args.batch_size, backend=args.backend,
                             num_actors=args.num_actors, progress=not args.no_progress,
                             max_batch_tokens=args.max_batch_tokens, verify_existing=args.verify_existing,
                             engine_kwargs=engine_kwargs, context=context_from_args(args))
    except KeyboardInterrupt as exc:
        report = getattr(exc, "report", None)
        if report is not None:
            print(report.summary(), file=sys.stderr)
            _write_report(args, report)
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print(report.summary())
    written = _write_report(args, report)
    if report.documents == 0:
        _warn_empty_corpus(args.corpus)
        return 1
    if report.store_errors:
        print(f"{PROG} warm: error: the store refused {report.store_errors} encoded document(s) (reasons above); "
              "fix the store and rerun the same command to store them", file=sys.stderr)
        return 1
    return 0 if written else 1


def _write_report(args, report) -> bool:
    """``--json``: the report as JSON to stdout or a file, whatever happened to the store (a
    failure to write the file itself is an error naming it, with the summary already printed)."""
    if not args.json:
        return True
    text = json.dumps(report.to_dict(), indent=2)
    if args.json == "-":
        print(text)
        return True
    try:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    except OSError as exc:
        print(f"{PROG} warm: error: could not write the report to {args.json}: {exc}", file=sys.stderr)
        return False
    return True


def _warn_empty_corpus(corpus: str) -> None:
    print(f"{PROG} warm: warning: no documents found in {corpus!r} (a folder needs .txt / .md files below it, "
          "a .jsonl file one {\"id\": ..., \"text\": ...} object per line); nothing was warmed", file=sys.stderr)


def _human(n: float) -> str:
    from kvboost_rag.index.job import human_bytes

    return human_bytes(n)


def cmd_inspect(args) -> int:
    store = _disk_store(args)
    if getattr(store, "url", None) is None and not store.root.is_dir():
        print(f"error: no store at {store.root}", file=sys.stderr)
        return 1
    files = len(store)
    models = defaultdict(lambda: {"entries": 0, "tokens": 0, "bytes": 0, "kv_bits": set(), "encoding": set(),
                                  "with_context": 0})
    entries = 0
    total = 0
    for info in store.entries():
        entries += 1
        total += info.nbytes
        m = models[info.fingerprint]
        m["entries"] += 1
        m["tokens"] += info.num_tokens
        m["bytes"] += info.nbytes
        m["kv_bits"].add(info.kv_bits)
        m["encoding"].add(info.encoding_version)
        m["with_context"] += info.encoding == "context"
    summary = {
        "store": _store_name(store),
        "entries": entries,
        "bytes": total,
        "unreadable": files - entries,
        "stale_temp_files": len(store.stale_temp_files()),
        "models": {fp: {**m, "kv_bits": sorted(m["kv_bits"]), "encoding": sorted(m["encoding"])} for fp, m in models.items()},
    }
    bad: List = []
    if args.verify:
        bad = store.verify(remove=args.repair)
        summary["corrupt"] = [{"key": k, "reason": r} for k, r in bad]
    if args.repair:
        store.remove_stale_temp_files()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"store      {summary['store']}")
        print(f"entries    {entries}")
        print(f"bytes      {_human(total)} ({total} B)")
        if summary["unreadable"]:
            print(f"unreadable {summary['unreadable']} (header damaged; run --verify)")
        if summary["stale_temp_files"]:
            print(f"stale temp files {summary['stale_temp_files']} (left by killed writers; safe to delete)")
        print(f"models     {len(models)}")
        for fp, m in summary["models"].items():
            print(f"  {fp}: {m['entries']} entries, {m['tokens']} tokens, {_human(m['bytes'])}, "
                  f"kv_bits {','.join(map(str, m['kv_bits']))}, encoding {','.join(m['encoding']) or '?'}, "
                  f"{m['with_context']} encoded with context")
        if args.verify:
            if bad:
                print(f"CORRUPT    {len(bad)} entr{'y' if len(bad) == 1 else 'ies'}"
                      + (" (those the store wrote are deleted; warm recomputes them)" if args.repair else ""))
                for k, r in bad:
                    print(f"  {k}: {r}")
            else:
                print("verify     all entries intact")
    return 1 if bad else 0


def _read_prompt(args) -> str:
    from kvboost_rag import validate

    if args.prompt == "-":
        return validate.utf8("the prompt read from stdin", sys.stdin.buffer.read())
    return validate.text("the prompt", args.prompt)


def _read_doc(path: str) -> str:
    """A --doc file's text: UTF-8 text, or an error naming the file (before any model loads)."""
    from kvboost_rag import validate

    with open(path, "rb") as f:
        data = f.read()
    return validate.utf8(f"--doc {path!r}", data)


def cmd_ask(args) -> int:
    from kvboost_rag.store.disk import TieredStore
    from kvboost_rag.engine import KVBoostEngine
    from kvboost_rag.prompt.segments import Segment
    from kvboost_rag.store.memory import MemoryStore

    question = _read_prompt(args)
    docs = [_read_doc(path) for path in args.doc]  # bad files fail before the model loads
    if not question.strip() and not docs:
        from kvboost_rag.errors import EmptyInputError

        raise EmptyInputError("the prompt is empty; give the prompt as PROMPT, or '-' to read it from stdin")
    store = _disk_store(args)
    if not isinstance(store, TieredStore):  # an object store comes with its memory tier
        store = TieredStore(MemoryStore(), store)
    engine = KVBoostEngine.from_pretrained(args.model, store=store, device=args.device, dtype=args.dtype)
    if docs:
        parts = [Segment.document(d) for d in docs] + [question]
        prompt = engine.chat_segments([{"role": "user", "content": parts}]) if not args.raw else \
            [Segment.document(d) for d in docs] + [Segment.text(question)]
    elif not args.raw and getattr(engine.tokenizer, "chat_template", None):
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                      add_generation_prompt=True)
    else:
        prompt = question
    result = engine.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             strategy=args.strategy, recompute_ratio=args.recompute_ratio)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
        return 0
    print(result.text)
    print(f"\n[{result.strategy}] prompt {result.prompt_tokens} tokens: {result.reused_tokens} reused, "
          f"{result.recomputed_tokens} recomputed, {result.fresh_tokens} fresh | "
          f"TTFT {result.ttft_s * 1000:.0f} ms | {result.completion_tokens} tokens at {result.tokens_per_s:.1f} tok/s "
          f"| finish: {result.finish_reason}", file=sys.stderr)
    return 0
