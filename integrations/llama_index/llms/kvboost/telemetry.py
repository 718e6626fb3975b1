"""``TelemetryRecorder``: collects KVBoostLLM telemetry from LlamaIndex instrumentation events.

Query engines return only the answer text and source nodes; TTFT and reused-token counts travel
in ``additional_kwargs`` of the LLM's end events. Attach a recorder to read them.
"""
from __future__ import annotations

from typing import Any

from llama_index.core.bridge.pydantic import Field
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent, LLMCompletionEndEvent


class TelemetryRecorder(BaseEventHandler):
    """Records ``additional_kwargs`` of every KVBoostLLM chat/completion end event, in order.

    ``with TelemetryRecorder() as rec: query_engine.query(q)`` then ``rec.records[-1]["ttft_s"]``.
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
