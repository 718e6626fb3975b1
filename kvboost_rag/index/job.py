"""Index time, with an engine at hand: plan, batch, encode and store documents, one report.

This is the loop behind both ``engine.warm(texts)`` and :func:`kvboost_rag.app.warm.warm_corpus`
(which adds document sources, engine construction and the Ray backend). It only calls engine
methods (``tokenize_document``, ``chunk_key``, ``encode_batch``, ``register_text``), so it needs
no import of the engine module.

Properties, and why:

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
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from kvboost_rag.index.context import CONTEXT, ISOLATED, ContextConfig, arrange, nearest_neighbours
from kvboost_rag.index.sources import CorpusDoc

# Manifest row statuses.
ENCODED, SKIPPED, DUPLICATE, FAILED = "encoded", "skipped", "duplicate", "failed"


@dataclass
class WarmReport:
    """Outcome of a warm job.

    documents: documents seen; encoded: entries written by this run; skipped: already in the store;
    duplicates: identical to an earlier document of this run; failed: ``(document id, reason)``;
    store_errors: how many of ``failed`` were encoded but refused by the store (disk full, a directory
    in the entry's place): ``kvboost-rag warm`` exits 1 when there are any;
    tokens: tokens encoded by this run; bytes_written: bytes the store reported writing;
    encoding: ``"context"`` or ``"isolated"``; context_encoded / context_tokens: documents encoded
    after related documents and the extra tokens that cost;
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
    encoding: str = "isolated"
    context_encoded: int = 0  # documents encoded after a context of related documents
    context_tokens: int = 0   # context tokens those encodings attended to (computed unless neighbour_kv="stored")
    isolated_encoded: int = 0  # neighbour_kv="stored": isolated entries written first (their tokens: isolated_tokens)
    isolated_tokens: int = 0
    store_errors: int = 0     # failed documents the store refused to write (in ``failed`` with the reason)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

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
            f"failed           {len(self.failed)}" + (f" ({self.store_errors} refused by the store)"
                                                         if self.store_errors else ""),
            f"tokens encoded   {self.tokens}",
            *([f"with context     {self.context_encoded} documents, {self.context_tokens} extra tokens"]
              if self.encoding == "context" else ["encoding         isolated (no context)"]),
            f"bytes written    {human_bytes(self.bytes_written)}",
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
            if row.get("context_tokens"):
                self.context_encoded += 1
                self.context_tokens += int(row["context_tokens"])
        elif status == SKIPPED:
            self.skipped += 1
        elif status == DUPLICATE:
            self.duplicates += 1
        else:
            self.failed.append((str(row["id"]), str(row["reason"])))
            self.store_errors += bool(row.get("store_error"))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _row(doc: CorpusDoc, status: str, key: str = "", tokens: int = 0, nbytes: int = 0, reason: str = "",
         context_tokens: int = 0, store_error: bool = False) -> Dict[str, Any]:
    return {"id": doc.id, "key": key, "tokens": tokens, "bytes": nbytes, "status": status, "reason": reason,
            "context_tokens": context_tokens, "store_error": store_error}  # store_error: encoded, refused by the store


# ------------------------------------------------------------- core steps
def plan(
    engine: Any, store: Any, docs: Iterable[CorpusDoc], seen: set, verify_existing: bool, register: bool,
    encoding: str = ISOLATED, corpus: Optional[List[Tuple[CorpusDoc, List[int]]]] = None,
) -> Tuple[List[Tuple[CorpusDoc, List[int], str]], List[Dict[str, Any]]]:
    """Tokenize and key each document (under ``encoding``); split into pending work and rows already
    decided. ``corpus``, if given, collects every encodable document with its ids (the pool that
    index-time context is drawn from, stored documents included)."""
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
        key = engine.chunk_key(ids, encoding)
        if key in seen:
            rows.append(_row(doc, DUPLICATE, key, len(ids)))
            continue
        seen.add(key)
        if corpus is not None:
            corpus.append((doc, ids))
        stored = store.get(key, engine.fingerprint) is not None if verify_existing else store.contains(key, engine.fingerprint)
        if stored:
            if register:
                engine.register_text(doc.text)
            rows.append(_row(doc, SKIPPED, key, len(ids)))
        else:
            pending.append((doc, ids, key))
    return pending, rows


def batches(pending: List[Tuple[CorpusDoc, List[int], str]], batch_size: int, max_batch_tokens: Optional[int],
            contexts: Optional[Dict[str, Tuple[List[int], List[str]]]] = None):
    """Sort by length, context included (longest first: memory errors show up at once, ETA gets
    easier) and cut."""
    contexts = contexts or {}

    def length(item) -> int:
        return len(item[1]) + len(contexts.get(item[2], ((), ()))[0])

    ordered = sorted(pending, key=length, reverse=True)
    batch: list = []
    for item in ordered:
        longest = length(batch[0]) if batch else length(item)
        too_many_tokens = max_batch_tokens is not None and batch and longest * (len(batch) + 1) > max_batch_tokens
        if len(batch) >= batch_size or too_many_tokens:
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def encode_and_store(engine: Any, store: Any, batch: Sequence[Tuple[CorpusDoc, List[int], str]], register: bool,
                     contexts: Optional[Dict[str, Tuple[List[int], List[str]]]] = None,
                     neighbours_from: Optional[str] = None) -> List[Dict[str, Any]]:
    """Encode one batch and write every entry at once; on failure retry documents one by one.
    ``contexts`` maps a document's key to (context token ids, the context documents' keys);
    ``neighbours_from`` (an order, see :class:`ContextConfig`) places the context documents' stored
    isolated KV before each document instead of computing the context."""
    contexts = contexts or {}
    try:
        if neighbours_from is not None:  # the neighbours' stored KV stands in for the context
            chunks = [engine.encode_after(doc.text, _stored_neighbours(store, engine, contexts.get(key, ([], []))[1],
                                                                       neighbours_from))
                      for doc, _, key in batch]
        elif contexts:
            chunks = engine.encode_batch([doc.text for doc, _, _ in batch],
                                         contexts=[contexts.get(key, ([], []))[0] for _, _, key in batch])
        else:
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
            rows.extend(encode_and_store(engine, store, [item], register, contexts, neighbours_from))
        return rows
    rows = []
    for (doc, ids, key), chunk in zip(batch, chunks):
        if list(chunk.token_ids) != ids:
            rows.append(_row(doc, FAILED, key, len(ids), reason="encode_batch produced other token ids than tokenize_document"))
            continue
        ctx_ids, ctx_keys = contexts.get(key, ([], []))
        chunk.meta["encoding"] = CONTEXT if key in contexts else ISOLATED
        chunk.meta["context"] = ",".join(ctx_keys)
        try:
            written = store.put(key, chunk)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # one entry's place or the disk: this document fails, the job goes on
            rows.append(_row(doc, FAILED, key, len(ids), reason=store_failure(exc), store_error=True))
            continue
        if register:
            engine.register_text(doc.text)
        rows.append(_row(doc, ENCODED, key, len(ids), written, context_tokens=len(ctx_ids)))
    return rows


def store_failure(exc: BaseException) -> str:
    """A failed ``store.put`` as a report reason: the store's own words for a StoreError (a
    directory squatting the entry's path names the path to remove), the errno's meaning and the
    fix for a full disk or a read-only store."""
    import errno

    from kvboost_rag.errors import StoreError

    if isinstance(exc, StoreError):
        return f"store write failed: {exc}"
    code = getattr(exc, "errno", None)
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    if code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return (f"store write failed: {exc.strerror or exc}{where}; free disk space or give the store a budget "
                "(--max-bytes / max_bytes), then rerun to store the rest")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"store write failed: {exc.strerror or exc}{where}; the store is read-only for this process"
    return f"store write failed: {type(exc).__name__}: {exc}"


def _stored_neighbours(store: Any, engine: Any, keys: Sequence[str], order: str) -> list:
    """The stored isolated chunks of the context documents ``keys`` (most similar first), in the
    order they sit in the context; a missing one is an error (they are warmed first)."""
    chunks = []
    for key in keys:
        chunk = store.get(key, engine.fingerprint)
        if chunk is None:
            raise RuntimeError(f"the isolated entry of context document {key[:12]} is missing")
        chunks.append(chunk)
    return chunks[::-1] if order == "nearest_last" else chunks


def interrupted(exc: KeyboardInterrupt, report: "WarmReport", t0: float) -> KeyboardInterrupt:
    """Ctrl-C: mark the partial report and attach it to the exception being re-raised."""
    report.interrupted = True
    report.seconds = time.perf_counter() - t0
    exc.report = report  # type: ignore[attr-defined]
    return exc


def plan_contexts(engine: Any, pending: Sequence[Tuple[CorpusDoc, List[int], str]],
                  corpus: Sequence[Tuple[CorpusDoc, List[int]]], config: ContextConfig
                  ) -> Dict[str, Tuple[List[int], List[str]]]:
    """For each pending document (by key): its context (:func:`context_of`) among its nearest
    corpus neighbours."""
    if not pending or config.neighbours <= 0:
        return {}
    position = {doc.text: i for i, (doc, _) in enumerate(corpus)}
    neighbours = nearest_neighbours([doc.text for doc, _ in corpus], config.neighbours, config.embedder)
    return {key: context_of(engine, ids, [corpus[j][1] for j in neighbours[position[doc.text]]], config)
            for doc, ids, key in pending}


def context_of(engine: Any, ids: Sequence[int], neighbour_ids: Sequence[Sequence[int]], config: ContextConfig
               ) -> Tuple[List[int], List[str]]:
    """The context token ids of a document whose neighbours' ids are given most similar first
    (within the token budget and the room the context window leaves), and the isolated store keys
    of the neighbours used (recorded in the entry's metadata)."""
    window = getattr(engine, "context_window", None)
    room = window - len(getattr(engine, "preamble_ids", None) or ()) - len(ids) if window else None
    ctx_ids = arrange(neighbour_ids, config.order, config.max_tokens, room)
    used, total = [], 0
    for n in neighbour_ids:  # arrange keeps a prefix of them, in similarity order
        if total + len(n) > len(ctx_ids):
            break
        used.append(n)
        total += len(n)
    return ctx_ids, [engine.chunk_key(n, ISOLATED) for n in used]


def encode_in_context(engine: Any, store: Any, text: str, partner_texts: Sequence[str],
                      config: Optional[ContextConfig] = None) -> Dict[str, Any]:
    """Encode one document after ``partner_texts`` (most relevant first) and store it under its
    context key, replacing any entry there (a re-encoding with a better context); one row, like
    :func:`encode_and_store`'s."""
    config = config or ContextConfig(neighbours=len(partner_texts))
    doc = CorpusDoc("re-encode", text, "co-retrieval")
    ids = list(engine.tokenize_document(text))
    key = engine.chunk_key(ids, CONTEXT)
    neighbour_ids = [list(engine.tokenize_document(t)) for t in partner_texts]
    return encode_and_store(engine, store, [(doc, ids, key)], register=False,
                            contexts={key: context_of(engine, ids, neighbour_ids, config)})[0]


def index_documents(engine: Any, docs: Sequence[CorpusDoc], store: Any = None, *, batch_size: int = 8,
                    max_batch_tokens: Optional[int] = None, verify_existing: bool = False, register: bool = True,
                    progress: bool = False, on_batch: Optional[Callable[[List[Dict[str, Any]]], None]] = None,
                    report: Optional[WarmReport] = None, context: Optional[ContextConfig] = None) -> WarmReport:
    """Encode every document of ``docs`` that ``store`` (default ``engine.store``) lacks, and store it
    (see the module docstring). ``context``: encode each document after its nearest neighbours
    among ``docs`` (:mod:`kvboost_rag.index.context`); None encodes each alone. On Ctrl-C the
    partial report is attached to the ``KeyboardInterrupt`` as ``.report`` and the exception re-raised."""
    from tqdm.auto import tqdm

    store = store if store is not None else engine.store
    report = report if report is not None else WarmReport(backend="local")
    t0 = time.perf_counter()
    bar = None
    try:
        report.documents = len(docs)
        encoding = CONTEXT if context is not None and context.neighbours > 0 else ISOLATED
        stored_kv = encoding == CONTEXT and context.neighbour_kv == "stored"
        report.encoding = encoding
        corpus: List[Tuple[CorpusDoc, List[int]]] = []
        pending, rows = plan(engine, store, docs, set(), verify_existing, register, encoding, corpus)
        # neighbours first: a bad embedder fails before anything is written
        contexts = plan_contexts(engine, pending, corpus, context) if encoding == CONTEXT else {}
        if stored_kv:  # the neighbours' isolated entries next: their KV is the context
            first = index_documents(engine, docs, store, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                                    verify_existing=verify_existing, register=False, progress=progress)
            report.isolated_encoded, report.isolated_tokens = first.encoded, first.tokens
        for row in rows:
            report._add_row(row)
        total_tokens = sum(len(ids) + len(contexts.get(key, ((), ()))[0]) for _, ids, key in pending)
        bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="warm", disable=not progress, dynamic_ncols=True)
        done_docs = 0
        for batch in batches(pending, 1 if stored_kv else batch_size, max_batch_tokens, contexts):
            batch_rows = encode_and_store(engine, store, batch, register, contexts,
                                          context.order if stored_kv else None)
            for row in batch_rows:
                report._add_row(row)
            done_docs += len(batch)
            bar.update(sum(len(ids) + len(contexts.get(key, ((), ()))[0]) for _, ids, key in batch))
            bar.set_postfix_str(f"docs {done_docs}/{len(pending)}", refresh=False)
            if on_batch is not None:
                on_batch(batch_rows)
    except KeyboardInterrupt as exc:
        raise interrupted(exc, report, t0)
    finally:
        if bar is not None:
            bar.close()
    report.seconds = time.perf_counter() - t0
    return report
