"""``warm_corpus``: encode a corpus's documents into a KV store ahead of queries.

The job around :func:`kvboost_rag.index.job.index_documents` (the plan/batch/encode/store loop
and its guarantees: resumable, each document once, length-sorted batches, failures reported
per document): documents from any source (:mod:`kvboost_rag.index.sources`), an engine built from a
model path or factory, and a Ray backend.

By default each document is encoded after its nearest neighbours in the corpus
(:mod:`kvboost_rag.index.context`): the stored KV then carries the cross-document attention a
prompt with those documents has, which query-time recompute alone cannot restore.
``context="none"`` encodes each document alone.

``backend="ray"`` spreads the encoding over a Ray Data actor pool; each actor loads the model
itself and writes into the same :class:`~kvboost_rag.store.disk.DiskStore` directory (safe:
atomic renames) or the same object store (``s3://...``: one PUT per entry), returning only manifest
rows to the driver. The driver picks every document's
neighbours (embeddings only, no model) and ships their texts with the document.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Optional

from kvboost_rag.errors import InvalidConfigError
from kvboost_rag.index.context import CONTEXT, ISOLATED, ContextConfig, context_config, nearest_neighbours
from kvboost_rag.index.job import (DUPLICATE, FAILED, WarmReport, _row, batches, context_of, encode_and_store,
                                   index_documents, interrupted, plan)
from kvboost_rag.index.sources import CorpusDoc, Render, iter_documents

__all__ = ["WarmReport", "build_engine", "warm_corpus"]


# ------------------------------------------------------------------ engines
def build_engine(spec: Any, store: Any = None, **engine_kwargs: Any) -> Any:
    """An engine from ``spec``: an engine (returned as is), None (default model), a model path / HF
    id / .gguf file, or a zero-argument callable returning an engine or ``(model, tokenizer)``
    (picklable factories are how Ray actors and tests build their model)."""
    if hasattr(spec, "encode_batch"):
        return spec
    from kvboost_rag.engine import KVBoostEngine  # heavy (torch); only when an engine must be built

    if spec is None or isinstance(spec, (str, os.PathLike)):
        return KVBoostEngine.from_pretrained(None if spec is None else str(spec), store=store, **engine_kwargs)
    if callable(spec):
        made = spec()
        if hasattr(made, "encode_batch"):
            return made
        if isinstance(made, tuple) and len(made) == 2:
            return KVBoostEngine(made[0], made[1], store=store, **engine_kwargs)
        raise InvalidConfigError(
            f"model factory returned {type(made).__name__}; expected a KVBoostEngine or (model, tokenizer)"
        )
    raise InvalidConfigError(
        f"cannot build an engine from {type(spec).__name__}: pass an engine, a model path/id or a factory"
    )


# ---------------------------------------------------------------- public
def warm_corpus(
    documents: Any,
    engine_or_model: Any = None,
    store: Any = None,
    *,
    batch_size: int = 8,
    render: Optional[Render] = None,
    backend: str = "local",
    num_actors: int = 2,
    progress: bool = True,
    max_batch_tokens: Optional[int] = None,
    verify_existing: bool = False,
    register: bool = True,
    on_batch: Optional[Callable[[List[Dict[str, Any]]], None]] = None,
    engine_kwargs: Optional[Dict[str, Any]] = None,
    ray_remote_args: Optional[Dict[str, Any]] = None,
    context: Any = "auto",
) -> WarmReport:
    """Encode every document of ``documents`` that ``store`` lacks, and store it.

    documents: list of str / LangChain Documents / LlamaIndex nodes, a ``.jsonl`` file
        (``{"id", "text"}`` lines) or a folder of ``.txt``/``.md`` files (:mod:`kvboost_rag.index.sources`).
    engine_or_model: a :class:`~kvboost_rag.engine.KVBoostEngine`, a model path / HF id, None (the
        default model), or a picklable factory returning an engine or ``(model, tokenizer)``.
        ``backend="ray"`` needs a path/id or factory, since each actor loads its own copy.
    store: where entries go: a store, a directory or an object-store URL (``s3://bucket/prefix``,
        shared by every worker); default ``engine.store`` (local) or the default
        :class:`~kvboost_rag.store.disk.DiskStore` directory (ray).
    render: callable giving the exact text a chain will insert (see :mod:`kvboost_rag.index.sources`).
    batch_size / max_batch_tokens: documents per ``encode_batch`` call, optionally capped so that
        ``batch_len * longest_doc_tokens`` stays under ``max_batch_tokens``.
    verify_existing: check stored entries' checksums (``get``) instead of their headers
        (``contains``) before skipping them: slower, but also catches bit flips in tensor data.
    on_batch: called with the manifest rows of each finished batch (after they are stored).
    context: ``"auto"`` (default): each document is encoded after its nearest corpus neighbours by
        the packaged all-MiniLM-L6-v2; a :class:`~kvboost_rag.index.context.ContextConfig`
        (neighbours, token budget, order, embedder); your own embeddings (a LangChain
        ``Embeddings`` / ``VectorStore``, a LlamaIndex ``BaseEmbedding`` / index, or a callable
        ``texts -> vectors``); ``"none"`` / None: each document alone.
    Returns a :class:`WarmReport`. On Ctrl-C the partial report is attached to the
    ``KeyboardInterrupt`` as ``.report`` and the exception re-raised.
    """
    if batch_size < 1:
        raise InvalidConfigError(f"batch_size must be >= 1, got {batch_size}")
    context = context_config(context)
    if backend == "ray":
        return _warm_ray(documents, engine_or_model, store, batch_size=batch_size, render=render,
                         num_actors=num_actors, progress=progress, max_batch_tokens=max_batch_tokens,
                         verify_existing=verify_existing, engine_kwargs=engine_kwargs or {},
                         ray_remote_args=ray_remote_args or {}, on_batch=on_batch, context=context)
    if backend != "local":
        raise InvalidConfigError(f"backend must be 'local' or 'ray', got {backend!r}")

    t_load = time.perf_counter()
    report = WarmReport(backend="local")
    store = _open_store_arg(store)  # "s3://bucket/prefix" or a directory: opened once, here
    engine = build_engine(engine_or_model, store=store, **(engine_kwargs or {}))
    store = store if store is not None else engine.store
    report.load_seconds = time.perf_counter() - t_load  # throughput excludes loading the model
    docs = list(iter_documents(documents, render))
    return index_documents(engine, docs, store, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                           verify_existing=verify_existing, register=register, progress=progress,
                           on_batch=on_batch, report=report, context=context)


# -------------------------------------------------------------------- ray
def _store_spec(store: Any) -> Dict[str, Any]:
    """Picklable description of a store that every actor can reopen (:func:`_open_spec`): a disk
    store's directory, or an object store's URL and options (each actor opens its own local tiers)."""
    from kvboost_rag.store.disk import DiskStore, TieredStore
    from kvboost_rag.store.object_store import is_store_url

    if isinstance(store, (str, os.PathLike)):
        store = _open_store_arg(store)
    spec = getattr(store, "spec", None)
    if callable(spec) and is_store_url(getattr(store, "url", None)):
        return {"object": spec()}
    disk = store.disk if isinstance(store, TieredStore) else store
    if disk is None:
        disk = DiskStore()
    if not isinstance(disk, DiskStore):
        raise InvalidConfigError(
            "backend='ray' writes from several processes, so it needs a DiskStore (or TieredStore) or an "
            f"object store (s3://...), not {type(store).__name__}"
        )
    return {"root": str(disk.root), "kv_bits": disk.kv_bits, "fsync": disk.fsync, "max_bytes": disk.max_bytes}


def _open_spec(spec: Dict[str, Any]) -> Any:
    """The store a :func:`_store_spec` describes."""
    if "object" in spec:
        from kvboost_rag.store.object_cache import open_object_store
        from kvboost_rag.store.object_store import ObjectStore

        options = dict(spec["object"])
        return open_object_store(**options) if "cache_dir" in options else ObjectStore(**options)
    from kvboost_rag.store.disk import DiskStore

    return DiskStore(spec["root"], kv_bits=spec["kv_bits"], fsync=spec["fsync"], max_bytes=spec["max_bytes"])


def _open_store_arg(store: Any) -> Any:
    """A store given by name (a directory or an object-store URL) opened with its tiers."""
    if isinstance(store, (str, os.PathLike)):
        from kvboost_rag.store.tiered import open_store

        return open_store(os.fspath(store))
    return store


class _RayWarmWorker:
    """Ray Data actor: loads the model once, warms each batch it gets into the shared directory."""

    def __init__(self, model_spec: Any, store_spec: Dict[str, Any], engine_kwargs: Dict[str, Any],
                 verify_existing: bool, max_batch_tokens: Optional[int], batch_size: int,
                 context: Optional[ContextConfig] = None) -> None:
        self.store = _open_spec(store_spec)
        self.engine = build_engine(model_spec, store=self.store, **engine_kwargs)
        self.verify_existing = verify_existing
        self.max_batch_tokens = max_batch_tokens
        self.batch_size = batch_size
        self.context = context

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, list]:
        docs = [CorpusDoc(str(i), str(t), "ray") for i, t in zip(batch["id"], batch["text"])]
        encoding = CONTEXT if self.context is not None else ISOLATED
        pending, rows = plan(self.engine, self.store, docs, set(), self.verify_existing, register=False,
                             encoding=encoding)
        contexts = {}
        if self.context is not None:
            near = {str(t): [str(n) for n in ns] for t, ns in zip(batch["text"], batch["neighbours"])}
            for doc, ids, key in pending:
                neighbour_ids = [self.engine.tokenize_document(n) for n in near.get(doc.text, [])]
                contexts[key] = context_of(self.engine, ids, neighbour_ids, self.context)
        # stored neighbour KV: one document per forward, after its neighbours' isolated entries
        # (the driver's first pass wrote them to the shared store)
        stored = self.context is not None and self.context.neighbour_kv == "stored"
        for sub in batches(pending, 1 if stored else self.batch_size, self.max_batch_tokens, contexts):
            rows.extend(encode_and_store(self.engine, self.store, sub, register=False, contexts=contexts,
                                         neighbours_from=self.context.order if stored else None))
        cols = ("id", "key", "tokens", "bytes", "status", "reason", "context_tokens", "store_error")
        return {c: [r[c] for r in rows] for c in cols}


def _warm_ray(documents: Any, model_spec: Any, store: Any, *, batch_size: int, render: Optional[Render],
              num_actors: int, progress: bool, max_batch_tokens: Optional[int], verify_existing: bool,
              engine_kwargs: Dict[str, Any], ray_remote_args: Dict[str, Any],
              on_batch: Optional[Callable[[List[Dict[str, Any]]], None]],
              context: Optional[ContextConfig] = None) -> WarmReport:
    if hasattr(model_spec, "encode_batch"):
        raise InvalidConfigError(
            "backend='ray' loads the model in each actor: pass a model path/id or a picklable factory, "
            "not a loaded engine"
        )
    if num_actors < 1:
        raise InvalidConfigError(f"num_actors must be >= 1, got {num_actors}")
    spec = _store_spec(store)
    import ray  # only on this path: ray is an optional dependency
    import ray.data
    import torch
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    report = WarmReport(backend="ray")
    docs = list(iter_documents(documents, render))
    report.documents = len(docs)
    # Failures and exact duplicates are settled here, so actors only see distinct texts; sorting
    # by length keeps each actor batch of similar lengths.
    items, seen_text = [], set()
    for doc in docs:
        if doc.error:
            report._add_row(_row(doc, FAILED, reason=doc.error))
        elif doc.text in seen_text:
            report._add_row(_row(doc, DUPLICATE))
        else:
            seen_text.add(doc.text)
            items.append({"id": doc.id, "text": doc.text})
    report.encoding = CONTEXT if context is not None else ISOLATED
    if context is not None:  # neighbours over the whole corpus, picked once here
        texts = [it["text"] for it in items]
        for it, near in zip(items, nearest_neighbours(texts, context.neighbours, context.embedder)):
            it["neighbours"] = [texts[j] for j in near]
    items.sort(key=lambda it: len(it["text"]), reverse=True)
    gpus = 1 if torch.cuda.is_available() else 0
    remote = {"num_cpus": 0 if gpus else 1, **ray_remote_args}

    def run_pass(pass_context: Optional[ContextConfig], into: WarmReport, desc: str) -> None:
        """One pass of the actor pool over ``items``, its rows added to ``into``."""
        ds = ray.data.from_items(items).map_batches(
            _RayWarmWorker,
            fn_constructor_kwargs={
                "model_spec": model_spec, "store_spec": spec, "engine_kwargs": engine_kwargs,
                "verify_existing": verify_existing, "max_batch_tokens": max_batch_tokens, "batch_size": batch_size,
                "context": pass_context,
            },
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            batch_size=batch_size,
            num_gpus=gpus,
            batch_format="numpy",
            **remote,
        )
        bar = tqdm(total=len(items), unit="doc", desc=desc, disable=not progress, dynamic_ncols=True)
        try:
            for row in ds.iter_rows():
                row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
                into._add_row(row)
                bar.update(1)
                elapsed = time.perf_counter() - t0
                bar.set_postfix_str(f"{into.tokens / elapsed:,.0f} tok/s" if elapsed > 0 else "", refresh=False)
                if on_batch is not None and into is report:
                    on_batch([row])
        except KeyboardInterrupt as exc:
            raise interrupted(exc, report, t0)
        finally:
            bar.close()

    if items:
        if context is not None and context.neighbour_kv == "stored":  # the neighbours' isolated entries first
            first = WarmReport(backend="ray")
            run_pass(None, first, "warm (ray, isolated)")
            report.isolated_encoded, report.isolated_tokens = first.encoded, first.tokens
        run_pass(context, report, "warm (ray)")
    report.seconds = time.perf_counter() - t0
    return report
