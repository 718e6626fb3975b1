"""``warm_corpus``: encode a corpus's documents into a KV store ahead of queries.

Properties the job guarantees, and why:

* **Resumable**: before encoding, every document's key is checked with ``store.contains`` (the
  store itself is the source of truth, no side manifest that could disagree with it), and each
  batch is written as soon as it is encoded. After a crash, ``kill -9`` or Ctrl-C a rerun skips all
  finished entries and loses nothing (the disk store's writes are atomic).
* **Each document once**: identical documents (same key, i.e. same tokens for the same model)
  are encoded once per run and reported as duplicates.
* **Efficient batches**: pending documents are sorted by token count and cut into batches of
  similar length, so ``engine.encode_batch``'s padding wastes little compute.
* **Failures do not stop the job**: an empty document, a render error or a document longer than
  the context window is reported with its reason; if a batch fails, its documents are retried one
  by one so only the culprit fails.

``backend="ray"`` spreads the encoding over a Ray Data actor pool; each actor loads the model
itself and writes into the same :class:`~kvboost_rag.disk_store.DiskStore` directory (safe:
atomic renames), returning only manifest rows to the driver.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .corpus import CorpusDoc, Render, iter_documents
from .errors import InvalidConfigError

# Manifest row statuses.
ENCODED, SKIPPED, DUPLICATE, FAILED = "encoded", "skipped", "duplicate", "failed"


@dataclass
class WarmReport:
    """Outcome of a warm job.

    documents: documents seen; encoded: entries written by this run; skipped: already in the store;
    duplicates: identical to an earlier document of this run; failed: ``(document id, reason)``;
    tokens: tokens encoded by this run; bytes_written: bytes the store reported writing;
    seconds: time spent planning, encoding and writing (with Ray: the whole distributed job,
    including actors loading the model).
    """

    documents: int = 0
    encoded: int = 0
    skipped: int = 0
    duplicates: int = 0
    failed: List[Tuple[str, str]] = field(default_factory=list)
    tokens: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    backend: str = "local"
    load_seconds: float = 0.0  # building the engine / loading the model (local backend), not in ``seconds``

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def seen(self) -> int:
        """Alias of ``documents`` (the name :class:`kvboost_rag.engine.WarmReport` uses)."""
        return self.documents

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["failed"] = [{"id": i, "reason": r} for i, r in self.failed]
        d["tokens_per_s"] = round(self.tokens_per_s, 1)
        return d

    def summary(self) -> str:
        """Human-readable lines for the CLI."""
        lines = [
            f"documents seen   {self.documents}",
            f"encoded          {self.encoded}",
            f"skipped (stored) {self.skipped}",
            f"duplicates       {self.duplicates}",
            f"failed           {len(self.failed)}",
            f"tokens encoded   {self.tokens}",
            f"bytes written    {_human_bytes(self.bytes_written)}",
            f"throughput       {self.tokens_per_s:,.0f} tokens/s",
            f"time             {self.seconds:.1f} s",
        ]
        for doc_id, reason in self.failed[:20]:
            lines.append(f"  failed {doc_id}: {reason}")
        if len(self.failed) > 20:
            lines.append(f"  ... and {len(self.failed) - 20} more failures")
        if self.interrupted:
            lines.append("interrupted: rerun the same command to finish (stored entries are kept)")
        return "\n".join(lines)

    def _add_row(self, row: Dict[str, Any]) -> None:
        status = row["status"]
        if status == ENCODED:
            self.encoded += 1
            self.tokens += int(row["tokens"])
            self.bytes_written += int(row["bytes"])
        elif status == SKIPPED:
            self.skipped += 1
        elif status == DUPLICATE:
            self.duplicates += 1
        else:
            self.failed.append((str(row["id"]), str(row["reason"])))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _row(doc: CorpusDoc, status: str, key: str = "", tokens: int = 0, nbytes: int = 0, reason: str = "") -> Dict[str, Any]:
    return {"id": doc.id, "key": key, "tokens": tokens, "bytes": nbytes, "status": status, "reason": reason}


# ------------------------------------------------------------------ engines
def build_engine(spec: Any, store: Any = None, **engine_kwargs: Any) -> Any:
    """An engine from ``spec``: an engine (returned as is), None (default model), a model path / HF
    id / .gguf file, or a zero-argument callable returning an engine or ``(model, tokenizer)``
    (picklable factories are how Ray actors and tests build their model)."""
    if hasattr(spec, "encode_batch"):
        return spec
    from .engine import KVBoostEngine  # engine imports are heavy; only when needed

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


# ------------------------------------------------------------- core steps
def _plan(
    engine: Any, store: Any, docs: Iterable[CorpusDoc], seen: set, verify_existing: bool, register: bool
) -> Tuple[List[Tuple[CorpusDoc, List[int], str]], List[Dict[str, Any]]]:
    """Tokenize and key each document; split into pending work and rows already decided."""
    pending, rows = [], []
    limit = getattr(engine, "context_window", None)
    for doc in docs:
        if doc.error:
            rows.append(_row(doc, FAILED, reason=doc.error))
            continue
        try:
            ids = list(engine.tokenize_document(doc.text))
        except Exception as exc:
            rows.append(_row(doc, FAILED, reason=f"tokenization failed: {type(exc).__name__}: {exc}"))
            continue
        if not ids:
            rows.append(_row(doc, FAILED, reason="empty document (no tokens)"))
            continue
        # the engine encodes each document after its preamble, so both must fit the window
        overhead = len(getattr(engine, "preamble_ids", None) or ())
        if limit and len(ids) + overhead > limit:
            rows.append(_row(doc, FAILED, reason=f"{len(ids)} tokens (+{overhead} preamble) do not fit the context "
                                                 f"window ({limit}); split the document into smaller chunks"))
            continue
        key = engine.chunk_key(ids)
        if key in seen:
            rows.append(_row(doc, DUPLICATE, key, len(ids)))
            continue
        seen.add(key)
        stored = store.get(key, engine.fingerprint) is not None if verify_existing else store.contains(key, engine.fingerprint)
        if stored:
            if register:
                engine.register_text(doc.text)
            rows.append(_row(doc, SKIPPED, key, len(ids)))
        else:
            pending.append((doc, ids, key))
    return pending, rows


def _batches(pending: List[Tuple[CorpusDoc, List[int], str]], batch_size: int, max_batch_tokens: Optional[int]):
    """Sort by length (longest first: memory errors show up at once, ETA gets easier) and cut."""
    ordered = sorted(pending, key=lambda p: len(p[1]), reverse=True)
    batch: list = []
    for item in ordered:
        longest = len(batch[0][1]) if batch else len(item[1])
        too_many_tokens = max_batch_tokens is not None and batch and longest * (len(batch) + 1) > max_batch_tokens
        if len(batch) >= batch_size or too_many_tokens:
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _encode_and_store(engine: Any, store: Any, batch: Sequence[Tuple[CorpusDoc, List[int], str]], register: bool) -> List[Dict[str, Any]]:
    """Encode one batch and write every entry at once; on failure retry documents one by one."""
    try:
        chunks = engine.encode_batch([doc.text for doc, _, _ in batch])
        if len(chunks) != len(batch):
            raise RuntimeError(f"encode_batch returned {len(chunks)} chunks for {len(batch)} texts")
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        if len(batch) == 1:
            doc, ids, key = batch[0]
            return [_row(doc, FAILED, key, len(ids), reason=f"encoding failed: {type(exc).__name__}: {exc}")]
        rows = []
        for item in batch:
            rows.extend(_encode_and_store(engine, store, [item], register))
        return rows
    rows = []
    for (doc, ids, key), chunk in zip(batch, chunks):
        if list(chunk.token_ids) != ids:
            rows.append(_row(doc, FAILED, key, len(ids), reason="encode_batch produced other token ids than tokenize_document"))
            continue
        written = store.put(key, chunk)
        if register:
            engine.register_text(doc.text)
        nbytes = written if isinstance(written, int) else chunk.nbytes
        rows.append(_row(doc, ENCODED, key, len(ids), nbytes))
    return rows


# ---------------------------------------------------------------- public
def _interrupted(exc: KeyboardInterrupt, report: "WarmReport", t0: float) -> KeyboardInterrupt:
    """Ctrl-C: mark the partial report and attach it to the exception being re-raised."""
    report.interrupted = True
    report.seconds = time.perf_counter() - t0
    exc.report = report  # type: ignore[attr-defined]
    return exc


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
) -> WarmReport:
    """Encode every document of ``documents`` that ``store`` lacks, and store it.

    documents: list of str / LangChain Documents / LlamaIndex nodes, a ``.jsonl`` file
        (``{"id", "text"}`` lines) or a folder of ``.txt``/``.md`` files (:mod:`kvboost_rag.corpus`).
    engine_or_model: a :class:`~kvboost_rag.engine.KVBoostEngine`, a model path / HF id, None (the
        default model), or a picklable factory returning an engine or ``(model, tokenizer)``.
        ``backend="ray"`` needs a path/id or factory, since each actor loads its own copy.
    store: where entries go; default ``engine.store`` (local) or the default
        :class:`~kvboost_rag.disk_store.DiskStore` directory (ray).
    render: callable giving the exact text a chain will insert (see :mod:`kvboost_rag.corpus`).
    batch_size / max_batch_tokens: documents per ``encode_batch`` call, optionally capped so that
        ``batch_len * longest_doc_tokens`` stays under ``max_batch_tokens``.
    verify_existing: check stored entries' checksums (``get``) instead of their headers
        (``contains``) before skipping them: slower, but also catches bit flips in tensor data.
    on_batch: called with the manifest rows of each finished batch (after they are stored).
    Returns a :class:`WarmReport`. On Ctrl-C the partial report is attached to the
    ``KeyboardInterrupt`` as ``.report`` and the exception re-raised.
    """
    if batch_size < 1:
        raise InvalidConfigError(f"batch_size must be >= 1, got {batch_size}")
    if backend == "ray":
        return _warm_ray(documents, engine_or_model, store, batch_size=batch_size, render=render,
                         num_actors=num_actors, progress=progress, max_batch_tokens=max_batch_tokens,
                         verify_existing=verify_existing, engine_kwargs=engine_kwargs or {},
                         ray_remote_args=ray_remote_args or {}, on_batch=on_batch)
    if backend != "local":
        raise InvalidConfigError(f"backend must be 'local' or 'ray', got {backend!r}")

    from tqdm.auto import tqdm

    t_load = time.perf_counter()
    report = WarmReport(backend="local")
    engine = build_engine(engine_or_model, store=store, **(engine_kwargs or {}))
    store = store if store is not None else engine.store
    t0 = time.perf_counter()  # throughput excludes loading the model
    report.load_seconds = t0 - t_load
    bar = None
    try:
        docs = list(iter_documents(documents, render))
        report.documents = len(docs)
        pending, rows = _plan(engine, store, docs, set(), verify_existing, register)
        for row in rows:
            report._add_row(row)
        total_tokens = sum(len(ids) for _, ids, _ in pending)
        bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="warm", disable=not progress, dynamic_ncols=True)
        done_docs = 0
        for batch in _batches(pending, batch_size, max_batch_tokens):
            batch_rows = _encode_and_store(engine, store, batch, register)
            for row in batch_rows:
                report._add_row(row)
            done_docs += len(batch)
            bar.update(sum(len(ids) for _, ids, _ in batch))
            bar.set_postfix_str(f"docs {done_docs}/{len(pending)}", refresh=False)
            if on_batch is not None:
                on_batch(batch_rows)
    except KeyboardInterrupt as exc:
        raise _interrupted(exc, report, t0)
    finally:
        if bar is not None:
            bar.close()
    report.seconds = time.perf_counter() - t0
    return report


# -------------------------------------------------------------------- ray
def _store_spec(store: Any) -> Dict[str, Any]:
    """Picklable description of a disk store that every actor can reopen."""
    from .disk_store import DiskStore, TieredStore

    disk = store.disk if isinstance(store, TieredStore) else store
    if disk is None:
        disk = DiskStore()
    if not isinstance(disk, DiskStore):
        raise InvalidConfigError(
            "backend='ray' writes from several processes, so it needs a DiskStore (or TieredStore), "
            f"not {type(store).__name__}"
        )
    return {"root": str(disk.root), "kv_bits": disk.kv_bits, "fsync": disk.fsync, "max_bytes": disk.max_bytes}


class _RayWarmWorker:
    """Ray Data actor: loads the model once, warms each batch it gets into the shared directory."""

    def __init__(self, model_spec: Any, store_spec: Dict[str, Any], engine_kwargs: Dict[str, Any],
                 verify_existing: bool, max_batch_tokens: Optional[int], batch_size: int) -> None:
        from .disk_store import DiskStore

        self.store = DiskStore(store_spec["root"], kv_bits=store_spec["kv_bits"], fsync=store_spec["fsync"],
                               max_bytes=store_spec["max_bytes"])
        self.engine = build_engine(model_spec, store=self.store, **engine_kwargs)
        self.verify_existing = verify_existing
        self.max_batch_tokens = max_batch_tokens
        self.batch_size = batch_size

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, list]:
        docs = [CorpusDoc(str(i), str(t), "ray") for i, t in zip(batch["id"], batch["text"])]
        pending, rows = _plan(self.engine, self.store, docs, set(), self.verify_existing, register=False)
        for sub in _batches(pending, self.batch_size, self.max_batch_tokens):
            rows.extend(_encode_and_store(self.engine, self.store, sub, register=False))
        cols = ("id", "key", "tokens", "bytes", "status", "reason")
        return {c: [r[c] for r in rows] for c in cols}


def _warm_ray(documents: Any, model_spec: Any, store: Any, *, batch_size: int, render: Optional[Render],
              num_actors: int, progress: bool, max_batch_tokens: Optional[int], verify_existing: bool,
              engine_kwargs: Dict[str, Any], ray_remote_args: Dict[str, Any],
              on_batch: Optional[Callable[[List[Dict[str, Any]]], None]]) -> WarmReport:
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
    items.sort(key=lambda it: len(it["text"]), reverse=True)
    if items:
        gpus = 1 if torch.cuda.is_available() else 0
        remote = {"num_cpus": 0 if gpus else 1, **ray_remote_args}
        ds = ray.data.from_items(items).map_batches(
            _RayWarmWorker,
            fn_constructor_kwargs={
                "model_spec": model_spec, "store_spec": spec, "engine_kwargs": engine_kwargs,
                "verify_existing": verify_existing, "max_batch_tokens": max_batch_tokens, "batch_size": batch_size,
            },
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            batch_size=batch_size,
            num_gpus=gpus,
            batch_format="numpy",
            **remote,
        )
        bar = tqdm(total=len(items), unit="doc", desc="warm (ray)", disable=not progress, dynamic_ncols=True)
        try:
            for row in ds.iter_rows():
                row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
                report._add_row(row)
                bar.update(1)
                elapsed = time.perf_counter() - t0
                bar.set_postfix_str(f"{report.tokens / elapsed:,.0f} tok/s" if elapsed > 0 else "", refresh=False)
                if on_batch is not None:
                    on_batch([row])
        except KeyboardInterrupt as exc:
            raise _interrupted(exc, report, t0)
        finally:
            bar.close()
    report.seconds = time.perf_counter() - t0
    return report
