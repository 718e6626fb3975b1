"""KVBoostLLM telemetry outside the LLM's own responses.

* **Query engine responses**: ``response.metadata["kvboost"]`` holds the telemetry of the LLM call
  that produced the answer (``ttft_s``, ``reused_tokens``, ``recomputed_tokens``, ``fresh_tokens``,
  ``documents``, ``documents_reused``, ``prompt_tokens``...), ``response.metadata["kvboost_calls"]``
  that of every KVBoostLLM call the synthesizer made (refine makes several), in order. Nothing to
  set up, any synthesizer. llama-index-core itself does not propagate an LLM's
  ``additional_kwargs`` into ``Response.metadata`` (that holds the source nodes' metadata, by node
  id), so this module does: an instrumentation handler on the root dispatcher opens a collector at
  each ``SynthesizeStartEvent`` (in a context variable, so concurrent queries stay apart), every
  KVBoostLLM call started inside the synthesis delivers its telemetry to it, and the
  ``SynthesizeEndEvent``'s response receives it. Streaming responses receive it when the stream
  has been read to its end (their token generator is read with the collector open, as stock
  synthesizers start the LLM call only at the first token).
* :class:`TelemetryRecorder`: every KVBoostLLM chat/completion end event, in order, for code that
  calls the LLM outside a query engine.
* **Retrieved nodes**: the same handler keeps the texts of the nodes a retrieval returned
  (``RetrievalEndEvent``) for the synthesis that follows it; KVBoostLLM calls inside that
  synthesis hand them over as document segments where its flat prompt holds them verbatim
  (:func:`retrieved_documents`): a stock query engine reuses its documents from the second query
  on, with no warm step.
"""
from __future__ import annotations

import contextvars
import threading
from typing import Any

from llama_index.core.bridge.pydantic import Field
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent, LLMCompletionEndEvent
from llama_index.core.instrumentation.events.retrieval import RetrievalEndEvent
from llama_index.core.instrumentation.events.synthesis import SynthesizeEndEvent, SynthesizeStartEvent

METADATA_KEY = "kvboost"
CALLS_KEY = "kvboost_calls"


class _Collector:
    """Telemetry of the KVBoostLLM calls of one synthesis, and the metadata dicts it goes to;
    ``documents``: the texts of the nodes retrieved for it (see :func:`retrieved_documents`)."""

    def __init__(self, documents: tuple = ()) -> None:
        self.documents: tuple = documents
        self.records: list[dict] = []
        self.targets: list[dict] = []
        self._lock = threading.Lock()

    def add(self, record: dict) -> None:
        with self._lock:
            self.records.append(dict(record))
            for target in self.targets:
                self._write(target)

    def attach(self, metadata: dict) -> None:
        with self._lock:
            self.targets.append(metadata)
            if self.records:
                self._write(metadata)

    def _write(self, metadata: dict) -> None:
        metadata[METADATA_KEY] = dict(self.records[-1])
        metadata[CALLS_KEY] = [dict(r) for r in self.records]


# The open syntheses of this context, innermost last.
_OPEN: contextvars.ContextVar[tuple] = contextvars.ContextVar("kvboost_open_syntheses", default=())
# The node texts of the last retrieval in this context, until a synthesis takes them.
_RETRIEVED: contextvars.ContextVar[tuple] = contextvars.ContextVar("kvboost_retrieved_nodes", default=())


def _node_texts(nodes: Any) -> tuple:
    """What a synthesizer inserts for each node (its content with the LLM's metadata, as
    ``BaseSynthesizer`` renders it) and its bare text (templates that insert only that)."""
    from llama_index.core.schema import MetadataMode

    out: list[str] = []
    for item in nodes or ():
        node = getattr(item, "node", item)
        for mode in (MetadataMode.LLM, MetadataMode.NONE):
            try:
                text = node.get_content(metadata_mode=mode)
            except Exception:  # a node type without text
                continue
            if isinstance(text, str) and text.strip() and text not in out:
                out.append(text)
    return tuple(out)


def retrieved_documents(sinks: tuple) -> list[str]:
    """The texts of the nodes retrieved for the syntheses a KVBoostLLM call runs in (``sinks``:
    :func:`current_sinks`): a stock query engine retrieves, then synthesizes with a flat prompt;
    found verbatim in it they are handed over as document segments
    (:func:`kvboost_rag.frameworks.options.mark_documents`), stored on first use, reused after."""
    return [t for sink in sinks for t in sink.documents]


def current_sinks() -> tuple:
    """The collectors a KVBoostLLM call starting now reports to (empty outside a synthesis)."""
    return _OPEN.get()


def deliver(sinks: tuple, record: dict) -> None:
    """Hand one finished call's telemetry to the syntheses it ran in."""
    for sink in sinks:
        sink.add(record)


class _ResponseMetadataHandler(BaseEventHandler):
    """Opens a collector at each synthesis start; writes it into the synthesis' response."""

    @classmethod
    def class_name(cls) -> str:
        return "KVBoostResponseMetadata"

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, RetrievalEndEvent):
            _RETRIEVED.set(_node_texts(event.nodes))
        elif isinstance(event, SynthesizeStartEvent):
            _OPEN.set(_OPEN.get() + (_Collector(_RETRIEVED.get()),))
            _RETRIEVED.set(())
        elif isinstance(event, SynthesizeEndEvent):
            open_ = _OPEN.get()
            if not open_:
                return
            collector = open_[-1]
            _OPEN.set(open_[:-1])
            response = event.response
            if response is None or not hasattr(response, "metadata"):
                return
            streaming = getattr(response, "response_gen", None) is not None
            if collector.records or streaming:
                if response.metadata is None:
                    response.metadata = {}
                collector.attach(response.metadata)
            if streaming:
                # Stock synthesizers start the LLM call lazily, at the first token read: keep
                # the synthesis open while the stream is read.
                response.response_gen = _reading_within(response.response_gen, collector)


def _reading_within(gen: Any, collector: _Collector) -> Any:
    """``gen`` (sync or async token generator), read with ``collector`` open."""
    if hasattr(gen, "__anext__"):
        async def agen():
            while True:
                token = _OPEN.set(_OPEN.get() + (collector,))
                try:
                    item = await gen.__anext__()
                except StopAsyncIteration:
                    return
                finally:
                    _OPEN.reset(token)
                yield item

        return agen()

    def sgen():
        it = iter(gen)
        while True:
            token = _OPEN.set(_OPEN.get() + (collector,))
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                _OPEN.reset(token)
            yield item

    return sgen()


_INSTALLED = threading.Lock()


def install_response_metadata() -> None:
    """Register the handler on the root dispatcher (once per process; called on import)."""
    with _INSTALLED:
        dispatcher = get_dispatcher()
        if not any(isinstance(h, _ResponseMetadataHandler) for h in dispatcher.event_handlers):
            dispatcher.add_event_handler(_ResponseMetadataHandler())


class TelemetryRecorder(BaseEventHandler):
    """Records ``additional_kwargs`` of every KVBoostLLM chat/completion end event, in order.

    ``with TelemetryRecorder() as rec: llm.chat(...)`` then ``rec.records[-1]["ttft_s"]``. For
    query engines, ``response.metadata["kvboost"]`` needs no recorder.
    """

    records: list = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "KVBoostTelemetryRecorder"

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, (LLMChatEndEvent, LLMCompletionEndEvent)) and event.response is not None:
            extra = event.response.additional_kwargs
            if "ttft_s" in extra:  # the final response of a KVBoostLLM call
                self.records.append(dict(extra))

    def __enter__(self) -> "TelemetryRecorder":
        get_dispatcher().add_event_handler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        handlers = get_dispatcher().event_handlers
        handlers[:] = [h for h in handlers if h is not self]  # identity: pydantic == compares fields
