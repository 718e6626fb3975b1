"""Bad inputs to the LlamaIndex LLM are refused with a KVBoostError naming the value and the fix,
before the engine generates anything."""
from __future__ import annotations

import asyncio

import pytest
from llama_index.core.base.llms.types import ChatMessage, MessageRole

from kvboost_rag.errors import InvalidConfigError, InvalidInputError
from llama_index.llms.kvboost import KVBoostLLM


@pytest.mark.parametrize("stop", [[""], ["Answer", ""]])
def test_an_empty_stop_string_is_refused(stop, tiny_engine):
    llm = KVBoostLLM(engine=tiny_engine, max_new_tokens=2)
    with pytest.raises(InvalidInputError, match="empty string"):
        llm.complete("Hello", stop=stop)
    with pytest.raises(InvalidInputError, match="empty string"):
        list(llm.stream_complete("Hello", stop=stop))
    with pytest.raises(InvalidInputError, match="empty string"):
        llm.chat([ChatMessage(role=MessageRole.USER, content="Hello")], stop=stop)
    with pytest.raises(InvalidInputError, match="empty string"):
        asyncio.run(llm.acomplete("Hello", stop=stop))
    with pytest.raises(InvalidInputError, match="empty string"):
        KVBoostLLM(engine=tiny_engine, max_new_tokens=2, stop=[""]).complete("Hello")


def test_other_bad_call_options_are_kvboost_errors(tiny_engine):
    llm = KVBoostLLM(engine=tiny_engine, max_new_tokens=2)
    with pytest.raises(InvalidConfigError, match="strategy.*got ''"):
        llm.complete("Hello", strategy="")
