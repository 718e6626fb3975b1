"""LangChain's standard unit suite for ChatKVBoost, on a tiny random-weight model built in code.

Fast: checks construction, standard parameters and serialization hooks, not answer quality.
The suite's ``api_key="test"`` is left out (a local model has none, and unknown constructor
arguments are refused). The tiny engine's tokenizer has a Hermes-style (Qwen2.5-like) chat template
with tool support, so tool calling and structured output are enabled; the model cannot switch
models per call.
"""
from __future__ import annotations

from typing import Any

from langchain_tests.unit_tests import ChatModelUnitTests

from kvboost_rag.testing.integration import shared_tools_engine

from ..standard_traits import WithTools


class TestChatKVBoostUnit(WithTools, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": shared_tools_engine()}

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        # The unit suite adds api_key="test" for hosted providers. A local model has no API key,
        # and unknown constructor arguments are an error here (extra="forbid"), not ignored.
        params = super().standard_chat_model_params
        params.pop("api_key", None)
        return params

    @property
    def supports_json_mode(self) -> bool:
        return True
