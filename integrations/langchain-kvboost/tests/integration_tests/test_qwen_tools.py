"""Tools in auto mode on a real model whose chat template takes them: Qwen2.5-Coder-0.5B-Instruct.

Marked ``models`` (``make test-models`` runs them, ``make test`` leaves them out); skipped, naming
``make models``, when the model's parts are not installed. The model decides whether to call
(``tool_choice`` left to it): Qwen2.5-Coder-0.5B writes its calls as bare or fenced JSON rather
than the ``<tool_call>`` block its template asks for, and every form must come back as
``AIMessage.tool_calls``. Greedy decoding: the answers are deterministic.

* a LangChain tool loop: question -> call -> ``ToolMessage`` -> an answer using the tool's result;
* LangChain's standard integration suite, its tool tests only (:data:`TOOL_TESTS`) on Qwen.
"""
from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_tests.integration_tests import ChatModelIntegrationTests

from kvboost_rag.testing.integration import QWEN_MODEL_SKIP, shared_qwen_engine
from langchain_kvboost import ChatKVBoost

from ..standard_traits import WithTools

pytestmark = [pytest.mark.models, pytest.mark.skipif(QWEN_MODEL_SKIP is not None, reason=QWEN_MODEL_SKIP or "")]


@tool
def headcount(office: str) -> int:
    """Number of people working in an office.

    Args:
        office: the office's city
    """
    return {"Berlin": 42, "Paris": 17}.get(office, 0)


@tool
def get_price(item: str) -> float:
    """Price of an item in euros.

    Args:
        item: what to price
    """
    return 3.5


TOOLS = {t.name: t for t in (headcount, get_price)}


def test_auto_mode_returns_the_call_the_model_writes():
    chat = ChatKVBoost(engine=shared_qwen_engine(), max_tokens=64)
    msg = chat.bind_tools([headcount, get_price]).invoke("How many people work in Berlin? Use a tool.")
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("headcount", {"office": "Berlin"})], msg.content
    assert msg.content == "" and msg.response_metadata["finish_reason"] == "tool_calls"
    streamed = None
    for chunk in chat.bind_tools([headcount, get_price]).stream("How many people work in Berlin? Use a tool."):
        streamed = chunk if streamed is None else streamed + chunk
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [("headcount", {"office": "Berlin"})]


def test_a_tool_loop_ends_in_an_answer_from_the_tool_result():
    """call -> ToolMessage -> answer. Qwen2.5-Coder-0.5B, greedy, calls the tool again after its
    result unless told to answer (measured: 24 prompt/tool-description/result variants, and
    repetition or presence penalties, all re-call); the loop's last turn says so, as an agent's
    closing step does (LlamaIndex: ``early_stopping_method="generate"``). The tools stay bound."""
    chat = ChatKVBoost(engine=shared_qwen_engine(), max_tokens=64).bind_tools([headcount, get_price])
    messages: list = [HumanMessage("How many people work in the Berlin office?")]
    ai = chat.invoke(messages)
    assert [(c["name"], c["args"]) for c in ai.tool_calls] == [("headcount", {"office": "Berlin"})], ai.content
    messages.append(ai)
    for call in ai.tool_calls:
        messages.append(TOOLS[call["name"]].invoke({**call, "type": "tool_call"}))  # a ToolMessage
    assert isinstance(messages[-1], ToolMessage) and messages[-1].content == "42"
    messages.append(SystemMessage("Answer the user's question from the tool result above, in one sentence, "
                                  "without calling a tool."))
    final = chat.invoke(messages)
    assert isinstance(final, AIMessage) and final.tool_calls == []
    assert "42" in final.content and "Berlin" in final.content, final.content


def test_structured_output_is_not_cut_by_a_small_max_tokens():
    """with_structured_output at max_tokens=32 returns a valid object on Qwen too (every method
    that constrains: json_schema, json_mode with a class, function_calling through a forced call)."""
    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        """An answer to a question."""

        answer: str = Field(description="the answer")
        confidence: float = Field(description="between 0 and 1")

    chat = ChatKVBoost(engine=shared_qwen_engine(), max_tokens=32)
    for method in ("json_schema", "json_mode", "function_calling"):
        out = chat.with_structured_output(Answer, method=method, include_raw=True).invoke("Who wrote Romeo and Juliet?")
        assert isinstance(out["parsed"], Answer) and out["parsing_error"] is None, (method, out["raw"].content)


#: The standard suite's tests that exercise tools (the rest run on SmolLM2 in test_standard.py).
TOOL_TESTS = {
    "test_tool_calling", "test_tool_calling_async", "test_tool_calling_with_no_arguments", "test_tool_choice",
    "test_bind_runnables_as_tools", "test_tool_message_histories_string_content",
    "test_tool_message_histories_list_content", "test_tool_message_error_status", "test_agent_loop",
    "test_unicode_tool_call_integration", "test_structured_few_shot_examples",
}


class TestChatKVBoostQwenTools(WithTools, ChatModelIntegrationTests):
    """The standard integration suite's tool tests with Qwen2.5-Coder-0.5B (see :data:`TOOL_TESTS`;
    tests/conftest.py deselects the others for this class)."""

    only_tests = TOOL_TESTS

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": shared_qwen_engine(), "max_tokens": 64}
