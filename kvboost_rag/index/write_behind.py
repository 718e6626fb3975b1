"""Write-behind: documents a prompt carried but the store lacked are stored after the answer.

Why: a chain whose documents were never warmed used to reuse nothing, silently, forever. Now the
answer is computed exactly as before (the missing documents' tokens are fresh, so the answer is
the same with this on or off), and once the answer is out each missing document is encoded
alone and stored, exactly as ``engine.warm`` would do it (same call,
:func:`kvboost_rag.index.job.index_documents`: same tokenization, key, preamble, store write and
detector registration). The next prompt that holds the document reuses it.

Which texts count as documents (candidates):

* every document segment (explicit :meth:`Segment.document`, or found by automatic detection)
  of an answer that did not reuse all of its documents; already stored ones are skipped by the
  indexing step's ``store.contains`` check;
* blocks of plain text recognised by :func:`recognise_documents` (conservative, see there):
  the blank-line separated blocks stock chains paste retrieved documents as.

Off the answer's clock: candidates are collected when the answer's stream has produced its
result (so after the first token, and after the last), and a worker thread does the encoding.
The worker is started lazily, exits as soon as its queue is empty (an idle engine holds no
thread), and before each document waits until no generation is in flight, up to
``idle_wait_s``; then it takes the engine's lock (inside ``encode_batch``) for that one document
only. Under load that never pauses it goes ahead after the wait, so writes are not starved: a
request arriving then waits for at most one document's encoding. The queue is bounded
(``max_queue`` documents); beyond it documents are dropped and counted. The worker is a daemon:
call :meth:`WriteBehind.flush` (``engine.flush_write_behind()``) before exiting a batch job.

Learning the context from traffic (``EngineConfig.learn_context``): after each answer the prompt's
documents are counted as retrieved together (:class:`~kvboost_rag.index.coretrieval.CoRetrieval`);
a document whose most frequent partners in this prompt are not the ones it was encoded after is
queued for re-encoding after them, on the same worker and with the same idle rule.

Also here, because it watches the same answers: a one-time warning when prompts that hold
documents keep arriving with nothing reused and write-behind cannot help (it is off, or the
documents failed to store). Prompts with no document (a tool call, structured output over a
question) could reuse nothing and do not count.
"""
from __future__ import annotations

import atexit
import logging
import re
import threading
import time
import weakref
from collections import OrderedDict, deque
from typing import Any, Iterable, Iterator, Optional, Sequence

from kvboost_rag.index.job import encode_in_context, index_documents
from kvboost_rag.prompt.segments import Segment
from kvboost_rag.index.sources import CorpusDoc

log = logging.getLogger("kvboost_rag")

# A line that separates blocks: blank, or a horizontal rule of 3+ '-' / '=' / '_' / '*'
# (LlamaIndex's default QA template fences its context with "---------------------").
_RULE = re.compile(r"[-=_*]{3,}")
# No minimum length: a retrieved chunk may be one sentence, and a minimum would leave stock chains
# over short documents with nothing to reuse. Kept as a parameter for callers that want one.
MIN_DOCUMENT_CHARS = 0


def _is_separator(line: str) -> bool:
    s = line.strip()
    return not s or _RULE.fullmatch(s) is not None


def _is_label(line: str) -> bool:
    """A line that introduces what follows ("Context:", "Use the documents below:")."""
    return line.rstrip().endswith(":")


def _is_instruction(text: str) -> bool:
    """A block that is the prompt's own words, never a document: it introduces something (ends
    with ``:``), asks (ends with ``?``), or is a heading (``# Tools``)."""
    return text.endswith((":", "?")) or (text.startswith("#") and "\n" not in text)


def recognise_documents(segments: Sequence[Segment], special_tokens: Iterable[str] = (),
                        min_chars: int = MIN_DOCUMENT_CHARS) -> list[str]:
    """Texts inside a prompt's *text* segments that are laid out like pasted documents.

    A false positive costs a background encoding and a store entry, never a wrong answer (a
    stored text is only reused where it occurs verbatim); the rules keep the prompt's own words
    out. A block is a run of lines between separator lines (blank lines or rules such as
    ``-----``); it is taken when all of these hold:

    * a separator line (or, at a text segment's start, a document segment followed by a newline)
      comes before it, and one comes after it: the first block of a prompt (its instruction)
      and the last (its question) never qualify. Except that the first block's lines after its
      first label line (``Context:``, ``...the following context:``) are a block of their own:
      the first document of a chain that writes ``{context}`` on the line after such a label;
    * it is not the prompt's own words: it does not end with ``:`` or ``?`` and is not a heading;
    * it is at least ``min_chars`` characters long (stripped; no minimum by default: retrieved
      chunks can be one sentence);
    * it holds none of the tokenizer's special-token strings (chat-template markers).

    This matches what stock chains produce: LangChain's ``create_stuff_documents_chain``, an LCEL
    ``format_docs`` and ``RetrievalQA`` join ``page_content`` with ``"\\n\\n"`` between an
    instruction and a question, LlamaIndex's text-QA template puts ``"\\n\\n"``-joined node texts
    between two rules, and :func:`kvboost_rag.prompt.chat.render_chat` joins message parts with
    blank lines. A document with blank lines inside is stored paragraph by paragraph (each part
    is still reused verbatim). The integrations pass the documents a framework retrieved as
    document segments instead (a prompt with ``recognise_documents = False`` is not searched).
    """
    specials = [s for s in special_tokens if s]
    found: list[str] = []
    n = len(segments)
    i = 0
    while i < n:
        if segments[i].is_document:
            i += 1
            continue
        j = i
        while j < n and not segments[j].is_document:
            j += 1
        span = "".join(s.text for s in segments[i:j])  # consecutive text segments are contiguous
        doc_after = j < n
        lines = span.splitlines(keepends=True)
        k = 0
        while k < len(lines):
            if _is_separator(lines[k]):
                k += 1
                continue
            start = k
            while k < len(lines) and not _is_separator(lines[k]):
                k += 1
            left = start > 0
            if not left:  # the first block: what follows its first label line, if anything does
                label = next((x for x in range(start, k - 1) if _is_label(lines[x])), None)
                if label is not None:
                    start, left = label + 1, True
            right = k < len(lines) or (doc_after and lines[k - 1].endswith(("\n", "\r")))
            text = "".join(lines[start:k]).strip()
            if (left and right and text and len(text) >= min_chars and not _is_instruction(text)
                    and not any(s in text for s in specials)):
                found.append(text)
        i = j
    return found


_LIVE: "weakref.WeakSet[WriteBehind]" = weakref.WeakSet()


@atexit.register
def _shutdown_workers() -> None:
    """At interpreter exit, let each worker finish the documents already queued (a script that
    answered one question and returned leaves its documents stored for the next run), within
    :attr:`WriteBehind.exit_drain_s`; then drop the rest and wait for the one being encoded.

    A daemon thread still inside torch while the interpreter finalizes aborts the process
    ("terminate called without an active exception", exit code 134): a script that answered
    one question and returned would fail."""
    for writer in list(_LIVE):
        writer.close(drain_s=writer.exit_drain_s)


def _ident(item: Any) -> Any:
    """What identifies a queued item: a document's text, or ("learn", text) for a re-encoding."""
    return item if isinstance(item, str) else ("learn", item[0])


class WriteBehind:
    """Per-engine write-behind queue, worker and counters (see the module docstring).

    Counters (documents): ``queued``, ``written`` (encoded and stored), ``skipped`` (already in the
    store when the worker got to them), ``dropped`` (queue full), ``failed``.
    """

    max_queue = 64          # documents waiting at most; more are dropped (and counted)
    idle_wait_s = 2.0       # how long the worker waits for no generation in flight
    warn_after = 3          # consecutive prompts with nothing reused before the one warning
    exit_drain_s = 10.0     # at interpreter exit, how long queued documents may still be encoded
    context_partners = 3    # partners a learned context holds at most
    min_together = 2        # prompts two documents must share before one is encoded after the other

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._cond = threading.Condition()
        self._queue: deque = deque()              # a text, or (text, partner texts, partner keys)
        self._pending: set[str] = set()           # queued or being encoded
        self._failed: "OrderedDict[str, None]" = OrderedDict()  # not retried (bounded)
        self._thread: Optional[threading.Thread] = None
        self._active = 0                          # generations in flight
        self.queued = self.written = self.skipped = self.dropped = self.failed = 0
        self.reencoded = 0
        self._learned: "OrderedDict[str, tuple]" = OrderedDict()  # key -> partners it was (re)encoded after
        self._no_reuse_run = 0
        self.warned = False
        self._closed = False
        _LIVE.add(self)

    def close(self, timeout: Optional[float] = 30.0, drain_s: float = 0.0) -> None:
        """Stop taking documents; give the worker up to ``drain_s`` s to encode the queued ones
        (it no longer waits for generations to finish), then drop what is left (counted as
        dropped) and wait up to ``timeout`` s for the one being encoded."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify_all()
        if drain_s > 0 and thread is not None and thread is not threading.current_thread():
            thread.join(drain_s)
        with self._cond:
            self.dropped += len(self._queue)
            for item in self._queue:
                self._pending.discard(_ident(item))
            self._queue.clear()
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def enabled(self) -> bool:
        return bool(getattr(self._engine.config, "write_behind", True))

    def stats(self) -> dict:
        with self._cond:
            return {"enabled": self.enabled, "queued": self.queued, "written": self.written,
                    "skipped": self.skipped, "dropped": self.dropped, "failed": self.failed,
                    "reencoded": self.reencoded, "pending": len(self._pending)}

    # ------------------------------------------------------------------ request side
    def track(self, prompt: Any, events: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        """Wrap one generation's event stream: mark it in flight, and once it has produced its
        result (first and last token out) offer its missing documents to the worker."""
        with self._cond:
            self._active += 1
        result = None
        try:
            for item in events:
                if item[1] is not None:
                    result = item[1]
                yield item
        finally:
            events.close()
            with self._cond:
                self._active -= 1
                self._cond.notify_all()
        if result is not None:
            try:
                self.after_answer(prompt, result)
            except Exception:  # never fail an answer that is already out
                log.exception("kvboost_rag: write-behind bookkeeping failed")

    def after_answer(self, prompt: Any, result: Any) -> None:
        """Queue the answer's missing documents; note whether anything was reused."""
        if result.strategy == "full" or result.prompt_tokens <= 0:
            return  # a full prefill asks for no reuse
        candidates = self.candidates(prompt, result)
        offered = self._offer(candidates) if self.enabled else 0
        if self.enabled and getattr(self._engine, "coretrieval", None) is not None:
            self._offer(self.learned_contexts(prompt))
        with self._cond:
            if result.reused_tokens > 0:
                self._no_reuse_run = 0
            if result.reused_tokens > 0 or offered:  # reuse, or write-behind will give some next time
                return
            if not candidates and not (getattr(result, "extra", None) or {}).get("documents"):
                return  # no document in the prompt (a tool call, structured output...): nothing to reuse
            self._no_reuse_run += 1
            run = self._no_reuse_run
            warn = run >= self.warn_after and not self.warned
            self.warned = self.warned or warn
        if warn:
            log.warning(
                "kvboost_rag: the last %d prompts reused no stored KV (every token was computed "
                "fresh, so there is no speed-up). Warm the corpus first (engine.warm(texts) or "
                "`kvboost-rag warm`, with exactly the rendered text the chain inserts), or pass "
                "documents as segments (Segment.document, langchain_kvboost.DocumentsPrompt, "
                "KVBoostSynthesizer) and keep write_behind on so they are stored after first use.",
                run)

    def candidates(self, prompt: Any, result: Any) -> list[str]:
        """Document texts of ``prompt`` that may be missing from the store (see module docstring)."""
        engine = self._engine
        try:
            segments = engine.segments(prompt)
        except Exception:
            return []  # e.g. a one-shot iterable already consumed
        extra = getattr(result, "extra", None) or {}
        texts = []
        if extra.get("documents_reused", 0) < extra.get("documents", 0):
            texts = [s.text for s in segments if s.is_document]
        if getattr(prompt, "recognise_documents", True):  # False: the caller marked the documents
            specials = getattr(engine.tokenizer, "all_special_tokens", ()) or ()
            texts += recognise_documents(segments, specials)
        return list(dict.fromkeys(texts))

    def learned_contexts(self, prompt: Any) -> list[tuple]:
        """Count the prompt's documents as retrieved together; return the re-encodings it calls
        for: ``(text, partner texts, partner keys)`` for each document whose most frequent partners
        here differ from those it was last encoded after."""
        engine = self._engine
        try:
            texts = list(dict.fromkeys(s.text for s in engine.segments(prompt) if s.is_document))
            keys = [engine.key_for_text(t) for t in texts]
        except Exception:
            return []
        if len(keys) < 2:
            return []
        engine.coretrieval.record(keys)
        by_key = dict(zip(keys, texts))
        items = []
        for key, text in by_key.items():
            partners = tuple(engine.coretrieval.partners(key, self.context_partners, among=by_key,
                                                         min_count=self.min_together))
            if partners and self._learned.get(key) != partners:
                items.append((text, [by_key[p] for p in partners], partners))
        return items

    def _offer(self, texts: Sequence[Any]) -> int:
        """Queue ``texts`` (bounded; duplicates of pending ones ignored); returns how many were
        offered, queued or already pending."""
        offered = 0
        with self._cond:
            if self._closed:
                return 0
            for item in texts:
                text = _ident(item)
                if text in self._failed:
                    continue
                offered += 1
                if text in self._pending:
                    continue
                if len(self._queue) >= self.max_queue:
                    self.dropped += 1
                    continue
                self._queue.append(item)
                self._pending.add(text)
                self.queued += 1
            if self._queue and self._thread is None:
                self._thread = threading.Thread(target=self._work, name="kvboost-write-behind", daemon=True)
                self._thread.start()
        return offered

    # ------------------------------------------------------------------ worker side
    def _work(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    self._thread = None  # exits; the next offer starts a new one
                    self._cond.notify_all()
                    return
                deadline = time.monotonic() + self.idle_wait_s
                while self._active and not self._closed and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                if not self._queue:  # closed while waiting
                    continue
                item = self._queue.popleft()
            text = _ident(item)
            if not isinstance(item, str):
                self._reencode(*item)
                with self._cond:
                    self._pending.discard(text)
                    self._cond.notify_all()
                continue
            try:
                report = index_documents(self._engine, [CorpusDoc("write-behind", text, "write-behind")],
                                         batch_size=1)
                ok, failed = report.encoded + report.skipped, len(report.failed)
                if failed:
                    log.debug("kvboost_rag: write-behind could not store a document: %s", report.failed)
            except Exception:
                log.debug("kvboost_rag: write-behind failed", exc_info=True)
                report, ok, failed = None, 0, 1
            with self._cond:
                if report is not None:
                    self.written += report.encoded
                    self.skipped += report.skipped
                self.failed += failed
                if failed and not ok:
                    self._failed[text] = None
                    while len(self._failed) > 1024:
                        self._failed.popitem(last=False)
                self._pending.discard(text)
                self._cond.notify_all()

    def _reencode(self, text: str, partner_texts: list, partner_keys: tuple) -> None:
        """Encode ``text`` after its partners unless its stored context already holds them all."""
        engine = self._engine
        try:
            key = engine.key_for_text(text)
            current = engine.store.get(engine.key_for_text(text, "context"), engine.fingerprint)
            have = set(filter(None, (current.meta.get("context", "") if current is not None else "").split(",")))
            if not set(partner_keys) <= have:
                row = encode_in_context(engine, engine.store, text, partner_texts)
                if row["status"] != "encoded":
                    raise RuntimeError(row.get("reason") or row["status"])
                with self._cond:
                    self.reencoded += 1
            with self._cond:
                self._learned[key] = partner_keys
                while len(self._learned) > 4096:
                    self._learned.popitem(last=False)
        except Exception:
            log.debug("kvboost_rag: re-encoding a document in context failed", exc_info=True)
            with self._cond:
                self.failed += 1

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every queued document is written (or failed); False on timeout.

        Do not call it while holding the engine's lock: the worker needs that lock to encode."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending, timeout)
