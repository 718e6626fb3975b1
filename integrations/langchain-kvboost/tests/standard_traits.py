"""What ChatKVBoost declares to LangChain's standard test suites (unit and integration), once.

Every engine: one loaded model (no per-call model override); structured output by constrained
decoding with ``method="json_schema"``. :class:`WithTools` adds tool calling and ``tool_choice``
for engines whose chat template takes tools.
"""
from __future__ import annotations

from langchain_kvboost import ChatKVBoost


class ChatKVBoostTraits:
    """Mix in before a ``langchain_tests`` suite class."""

    @property
    def chat_model_class(self) -> type[ChatKVBoost]:
        return ChatKVBoost

    @property
    def supports_model_override(self) -> bool:
        return False  # one loaded model per engine

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def structured_output_kwargs(self) -> dict:
        return {"method": "json_schema"}


class WithTools(ChatKVBoostTraits):
    """An engine whose chat template takes tools."""

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True
