"""Function calling and structured output (issue 13) for KVBoostLLM on a tiny random engine whose
chat template supports tools: a FunctionAgent whose first call is forced, chat_with_tools /
get_tool_calls_from_response, structured_predict / as_structured_llm through constrained
decoding, and document KV still reused under tools and schemas."""
from __future__ import annotations

import asyncio

import pytest
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.base.llms.types import ChatMessage, CitableBlock, MessageRole, TextBlock, ToolCallBlock
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel, Field

from kvboost_rag_bench.integration_testing import make_tiny_engine
from kvboost_rag_bench.testing import DOCS
from llama_index.llms.kvboost import KVBoostLLM, message_to_engine

from kvboost_rag_bench.integration_testing import make_tools_engine


class AddArgs(BaseModel):
    a: int = Field(ge=0, le=99)  # bounded: random weights cannot write digits forever
    b: int = Field(ge=0, le=99)


class City(BaseModel):
    """A city."""

    name: str = Field(max_length=6)
    big: bool


@pytest.fixture(scope="module")
def engine():
    e = make_tools_engine()
    e.warm(DOCS[:2])
    return e


def add_tool(calls: list) -> FunctionTool:
    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append((a, b))
        return a + b

    return FunctionTool.from_defaults(fn=add, fn_schema=AddArgs)


def test_function_calling_metadata_follows_the_template(engine):
    assert KVBoostLLM(engine=engine).metadata.is_function_calling_model
    assert not KVBoostLLM(engine=make_tiny_engine()).metadata.is_function_calling_model


def test_function_agent_calls_the_forced_tool_with_parsed_args(engine):
    calls: list = []
    llm = KVBoostLLM(engine=engine, max_new_tokens=80)
    agent = FunctionAgent(tools=[add_tool(calls)], llm=llm, initial_tool_choice="add")

    async def run():
        return await agent.run("Add 1 and 2.")

    output = asyncio.run(run())
    assert calls and all(0 <= a <= 99 and 0 <= b <= 99 for a, b in calls)
    assert output.tool_calls and output.tool_calls[0].tool_name == "add"
    assert output.tool_calls[0].tool_kwargs == {"a": calls[0][0], "b": calls[0][1]}


def test_chat_with_tools_required_and_streaming(engine):
    llm = KVBoostLLM(engine=engine, max_new_tokens=80)
    tool = add_tool([])
    response = llm.chat_with_tools([tool], user_msg="add 1 and 2", tool_required=True)
    (selection,) = llm.get_tool_calls_from_response(response)
    assert selection.tool_name == "add" and set(selection.tool_kwargs) == {"a", "b"} and selection.tool_id
    assert response.message.additional_kwargs["tool_calls"][0]["function"]["name"] == "add"
    assert response.additional_kwargs["completion_tokens"] > 0  # telemetry kept
    last = None
    for last in llm.stream_chat_with_tools([tool], user_msg="add 1 and 2", tool_choice="add"):
        pass
    assert llm.get_tool_calls_from_response(last)[0].tool_name == "add"
    # the call and its result go back to the template in the next turn
    history = [ChatMessage(role=MessageRole.USER, content="add"), response.message,
               ChatMessage(role=MessageRole.TOOL, content="3", additional_kwargs={"tool_call_id": selection.tool_id})]
    converted = [message_to_engine(m) for m in history]
    assert converted[1]["tool_calls"][0]["name"] == "add" and converted[2]["tool_call_id"] == selection.tool_id
    text = "".join(s.text for s in engine.chat_segments(converted, tools=[tool.metadata.to_openai_tool()]))
    assert '<tool_call>\n{"name": "add"' in text and "<tool_response>\n3\n</tool_response>" in text
    assert llm.get_tool_calls_from_response(llm.chat(history), error_on_no_tool_call=False) is not None


def test_tools_without_tool_template_raise_naming_the_model():
    from kvboost_rag.errors import ToolsNotSupportedError

    llm = KVBoostLLM(engine=make_tiny_engine(), max_new_tokens=5)
    with pytest.raises(ToolsNotSupportedError, match="no tool support"):
        llm.chat_with_tools([add_tool([])], user_msg="hi", tool_required=True)


def test_structured_predict_returns_an_instance(engine):
    llm = KVBoostLLM(engine=engine, max_new_tokens=80)
    prompt = PromptTemplate("Describe a city near {place}.")
    assert isinstance(llm.structured_predict(City, prompt, place="Lyon"), City)
    assert isinstance(asyncio.run(llm.astructured_predict(City, prompt, place="Lyon")), City)
    assert isinstance(list(llm.stream_structured_predict(City, prompt, place="Lyon"))[-1], City)
    assert isinstance(llm.as_structured_llm(City).complete("a city").raw, City)


def test_document_kv_is_reused_under_tools_and_schemas(engine):
    llm = KVBoostLLM(engine=engine, max_new_tokens=80)
    blocks = [TextBlock(text="Answer from the documents.")]
    blocks += [CitableBlock(content=[TextBlock(text=d)], title=f"d{i}", source=str(i)) for i, d in enumerate(DOCS[:2])]
    blocks.append(TextBlock(text="Question: add two numbers from them."))
    message = ChatMessage(role=MessageRole.USER, blocks=blocks)
    response = llm.chat_with_tools([add_tool([])], chat_history=[message], tool_required=True)
    assert any(isinstance(b, ToolCallBlock) for b in response.message.blocks)
    assert response.additional_kwargs["reused_tokens"] > 0
    structured = llm.chat([message], response_format=City)
    City.model_validate_json(structured.message.content)
    assert structured.additional_kwargs["reused_tokens"] > 0
