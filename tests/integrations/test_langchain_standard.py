"""LangChain's standard test suites for ChatKVBoost.

Unit suite: the tiny random model (fast, checks construction and parameters). Integration suite:
the real SmolLM2 (engine default), one shared engine, small ``max_tokens`` to stay fast on CPU.
Skipped features are declared through the suites' own flags: the model has no tool calling,
structured output, JSON mode or multimodal input, and cannot switch models per call.
"""
from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from kvb_models import shared_real_engine, shared_tiny_engine
from kvboost_rag_bench.testing import DOCS
from langchain_kvboost import ChatKVBoost, documents_to_message, warm_documents


class TestChatKVBoostUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatKVBoost]:
        return ChatKVBoost

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": shared_tiny_engine()}

    @property
    def supports_model_override(self) -> bool:
        return False  # one loaded model per engine


@pytest.mark.integration
class TestChatKVBoostIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatKVBoost]:
        return ChatKVBoost

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": shared_real_engine(), "max_tokens": 12}

    @property
    def supports_model_override(self) -> bool:
        return False

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        """A question over a warmed document: its KV is read from the store (cache_read > 0)."""
        model = ChatKVBoost(**self.chat_model_params)
        warm_documents(model, DOCS[:1])
        message = [documents_to_message(DOCS[:1], "What is a tuple?")]
        if not stream:
            result = model.invoke(message)
        else:
            result = None
            for chunk in model.stream(message):
                result = chunk if result is None else result + chunk
            assert isinstance(result, AIMessageChunk)
        assert result.usage_metadata["input_token_details"]["cache_read"] > 0
        return result
