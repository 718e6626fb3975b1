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

from kvboost_rag.testing.integration import ScriptedOutput, make_tiny_engine
from kvboost_rag.testing.models import DOCS
from llama_index.llms.kvboost import KVBoostLLM, message_to_engine

from kvboost_rag.testing.integration import make_tools_engine


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
    with pytest.raises(ToolsNotSupportedError, match="tiny-random-llama's chat template has no tools.*qwen2.5-coder-0.5b"):
        llm.chat_with_tools([add_tool([])], user_msg="hi", tool_required=True)


def test_a_function_agent_over_a_model_without_tools_says_what_to_use():
    """LlamaIndex itself says only "LLM must be a FunctionCallingLLM"."""
    from kvboost_rag.errors import ToolsNotSupportedError

    llm = KVBoostLLM(engine=make_tiny_engine(), max_new_tokens=5)
    assert not llm.metadata.is_function_calling_model  # AgentWorkflow picks a ReActAgent for it
    agent = FunctionAgent(tools=[add_tool([])], llm=llm)
    with pytest.raises(ToolsNotSupportedError, match="tiny-random-llama's chat template has no tools.*"
                                                     "'qwen2.5-coder-0.5b'.*make models"):
        async def run():
            return await agent.run(user_msg="add 1 and 2")

        asyncio.run(run())


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


# ------------------------------------------------------------------ streaming tool calls
SCRIPT = ('Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call> and '
          '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')


def weather_tool() -> FunctionTool:
    def get_weather(city: str) -> str:
        """Weather in a city."""
        return f"sunny in {city}"

    return FunctionTool.from_defaults(fn=get_weather)


def _collect(stream) -> list:
    if hasattr(stream, "__aiter__"):
        async def gather():
            return [r async for r in stream]
        return asyncio.run(gather())
    return list(stream)


def _selections(llm, response) -> list:
    return [(s.tool_name, s.tool_kwargs, s.tool_id)
            for s in llm.get_tool_calls_from_response(response, error_on_no_tool_call=False)]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_streamed_tool_calls_arrive_incrementally_and_add_up_to_chat(engine, monkeypatch, mode):
    script = ScriptedOutput(engine, monkeypatch, SCRIPT)
    llm = KVBoostLLM(engine=engine, max_new_tokens=200)
    tools = [weather_tool(), add_tool([])]
    chat = llm.chat_with_tools(tools, user_msg="weather in Paris, and 1 + 2?")
    expected = [("get_weather", {"city": "Paris"}, "call_" + "0" * 24),
                ("add", {"a": 1, "b": 2}, "call_" + "0" * 23 + "1")]
    assert _selections(llm, chat) == expected and chat.message.content == "Let me look.  and"

    script.reset()
    if mode == "sync":
        responses = list(llm.stream_chat_with_tools(tools, user_msg="weather in Paris, and 1 + 2?"))
    else:
        responses = _collect(asyncio.run(llm.astream_chat_with_tools(tools, user_msg="weather in Paris, and 1 + 2?")))
    last = responses[-1]
    # The last response is chat()'s: same message (content, ToolCallBlocks, OpenAI tool_calls), same calls.
    assert last.message == chat.message
    assert _selections(llm, last) == expected
    assert last.delta == "" and last.additional_kwargs["completion_tokens"] == chat.additional_kwargs["completion_tokens"]
    # Each response carries the message so far: content = the deltas so far, and the calls so far.
    text = ""
    counts = []
    for r in responses:
        text += r.delta or ""
        assert (r.message.content or "") == text
        calls = _selections(llm, r)
        assert calls == expected[:len(calls)]
        assert [c["id"] for c in r.message.additional_kwargs.get("tool_calls", [])] == [c[2] for c in calls]
        counts.append(len(calls))
    assert counts == sorted(counts)
    # Each call comes as soon as its block is closed, in order, before the end; text streams as decoded.
    first, second = counts.index(1), counts.index(2)
    assert first < second < len(responses) - 1
    assert responses[first].delta == "" and responses[first].message.content == "Let me look."
    assert "".join(r.delta for r in responses[first + 1:second + 1]) == "  and"
    assert len([r for r in responses[:first] if r.delta]) >= 2  # "Let me look." in several responses


def test_streamed_text_without_calls_is_unchanged(engine, monkeypatch):
    script = ScriptedOutput(engine, monkeypatch, "No tool is needed here.")
    llm = KVBoostLLM(engine=engine, max_new_tokens=50)
    chat = llm.chat_with_tools([add_tool([])], user_msg="hi")
    script.reset()
    with_tools = list(llm.stream_chat_with_tools([add_tool([])], user_msg="hi"))
    script.reset()
    plain = list(llm.stream_chat([ChatMessage(role=MessageRole.USER, content="hi")]))
    for responses in (with_tools, plain):
        *body, last = responses
        assert len(body) > 1 and all(r.delta for r in body)
        text = ""
        for r in body:
            text += r.delta
            assert r.message.content == text and not r.message.additional_kwargs and not r.additional_kwargs
        assert last.delta == "" and last.message.content == "No tool is needed here."
        assert last.additional_kwargs["completion_tokens"] > 0
        assert _selections(llm, last) == []
    assert with_tools[-1].message == chat.message
    assert with_tools[-1].message.content == plain[-1].message.content


def test_streaming_function_agent_sees_calls_as_they_complete(engine, monkeypatch):
    from llama_index.core.agent.workflow import AgentStream, ToolCallResult

    ScriptedOutput(engine, monkeypatch, SCRIPT, "It is sunny; 1 + 2 = 3.")
    added: list = []
    agent = FunctionAgent(tools=[weather_tool(), add_tool(added)], llm=KVBoostLLM(engine=engine, max_new_tokens=150),
                          streaming=True)  # 150: the second turn's prompt (tools, calls, results) is long

    async def run():
        handler = agent.run("weather in Paris, and 1 + 2?")
        events = [e async for e in handler.stream_events()]
        return events, await handler

    events, output = asyncio.run(run())
    streamed = [e for e in events if isinstance(e, AgentStream)]
    counts = [len(e.tool_calls) for e in streamed]
    assert 1 in counts and counts.index(1) < counts.index(2)  # the first call is known before the second
    first_turn = streamed[:counts.index(2) + 1]
    assert [c.tool_name for c in first_turn[-1].tool_calls] == ["get_weather", "add"]
    assert "".join(e.delta for e in first_turn) == "Let me look.  and"
    results = sorted((e.tool_name, e.tool_kwargs, str(e.tool_output)) for e in events if isinstance(e, ToolCallResult))
    assert results == [("add", {"a": 1, "b": 2}, "3"), ("get_weather", {"city": "Paris"}, "sunny in Paris")]
    assert added == [(1, 2)]
    assert str(output.response.content) == "It is sunny; 1 + 2 = 3."
    assert any(e.delta for e in streamed[counts.index(2) + 1:])  # the final answer streams too
