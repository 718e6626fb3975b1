"""Tools and structured output (issue 13) for ChatKVBoost on a tiny random engine whose chat
template supports tools: bind_tools (forced calls always parse), tool histories, response_format,
with_structured_output (every method, include_raw), clear errors, and document KV reuse kept."""
from __future__ import annotations

import asyncio
import json

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from pydantic import BaseModel, Field

from kvboost_rag.errors import InvalidInputError, StructuredOutputError, ToolsNotSupportedError
from kvboost_rag.testing.integration import make_tiny_engine
from kvboost_rag.testing.models import DOCS
from langchain_kvboost import ChatKVBoost, KVBoostLLM, documents_to_message, warm_documents

from kvboost_rag.testing.integration import ScriptedOutput, make_tools_engine


class Add(BaseModel):
    """Add two integers."""

    a: int = Field(ge=0, le=99)
    b: int = Field(ge=0, le=99)


class City(BaseModel):
    """A city (bounded so that random weights finish the object)."""

    name: str = Field(max_length=6)
    big: bool


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def engine():
    return make_tools_engine()


@pytest.fixture
def model(engine):
    return ChatKVBoost(engine=engine, max_tokens=60)


@pytest.mark.parametrize("choice", ["any", "required", True, "Add", {"type": "function", "function": {"name": "Add"}}])
def test_forced_tool_call_always_parses(model, choice):
    msg = model.bind_tools([Add, WEATHER], tool_choice=choice).invoke("add 1 and 2")
    assert isinstance(msg, AIMessage) and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call["id"] and call["type"] == "tool_call"
    if choice in ("Add",) or isinstance(choice, dict):
        assert call["name"] == "Add"
    if call["name"] == "Add":
        Add(**call["args"])
    else:
        assert set(call["args"]) == {"city"}
    assert msg.response_metadata["finish_reason"] == "tool_calls"


def test_forced_tool_call_streams_as_one_chunk_with_the_call(model):
    bound = model.bind_tools([Add], tool_choice="Add")
    chunks = list(bound.stream("add 1 and 2"))
    merged = chunks[0]
    for c in chunks[1:]:
        merged = merged + c
    assert len(merged.tool_calls) == 1 and merged.tool_calls[0]["name"] == "Add"
    Add(**merged.tool_calls[0]["args"])
    assert merged.usage_metadata["output_tokens"] > 0

    async def collect():
        return [c async for c in bound.astream("add 1 and 2")]

    achunks = asyncio.run(collect())
    amerged = achunks[0]
    for c in achunks[1:]:
        amerged = amerged + c
    assert amerged.tool_calls[0]["name"] == "Add"


def test_auto_tool_choice_parses_calls_written_by_the_model(engine, monkeypatch):
    """The model writes the call (scripted), in each form models write one: the Hermes block its
    template asks for, and the bare / fenced JSON small models write instead."""
    model = ChatKVBoost(engine=engine, max_tokens=200)
    for written in ('<tool_call>\n{"name": "Add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
                    '{"name": "Add", "arguments": {"a": 1, "b": 2}}',
                    '```json\n{"name": "Add", "arguments": {"a": 1, "b": 2}}\n```'):
        ScriptedOutput(engine, monkeypatch, written)
        msg = model.bind_tools([Add]).invoke("add 1 and 2")
        assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("Add", {"a": 1, "b": 2})], written
        assert msg.content == ""


def test_tool_results_and_calls_in_the_history_reach_the_template(model, engine):
    from langchain_kvboost.chat_models import message_to_engine

    call = {"name": "Add", "args": {"a": 1, "b": 2}, "id": "call_1", "type": "tool_call"}
    history = [HumanMessage("add 1 and 2"), AIMessage(content="", tool_calls=[call]),
               ToolMessage("3", tool_call_id="call_1", name="Add")]
    converted = [message_to_engine(m) for m in history]
    assert converted[1]["tool_calls"][0]["function"] == {"name": "Add", "arguments": {"a": 1, "b": 2}}
    assert converted[2]["role"] == "tool" and converted[2]["tool_call_id"] == "call_1"
    segments = engine.chat_segments(converted, tools=[WEATHER])
    text = "".join(s.text for s in segments)
    assert '<tool_call>\n{"name": "Add", "arguments": {"a": 1, "b": 2}}' in text
    assert "<tool_response>\n3\n</tool_response>" in text
    msg = model.bind_tools([Add]).invoke(history)  # the next turn runs
    assert isinstance(msg, AIMessage)


def test_tools_without_a_tool_template_name_the_model():
    model = ChatKVBoost(engine=make_tiny_engine(), max_tokens=5)
    with pytest.raises(ToolsNotSupportedError, match="^tiny-random-llama's chat template has no tools.*"
                                                     "'qwen2.5-coder-0.5b'.*make models"):
        model.bind_tools([Add]).invoke("hi")
    with pytest.raises(ToolsNotSupportedError):
        model.with_structured_output(Add, method="function_calling").invoke("hi")


def test_bind_without_tools_is_not_ignored(model):
    with pytest.raises(ValueError, match="names no bound tool"):
        model.bind_tools([Add], tool_choice="Nope")
    with pytest.raises(ValueError, match="without tools"):
        model.bind(tool_choice="any").invoke("hi")
    with pytest.raises(InvalidInputError, match="unsupported response_format"):
        model.bind(response_format={"type": "xml"}).invoke("hi")
    with pytest.raises(ValueError, match="not both"):
        model.bind_tools([Add]).bind(response_format={"type": "json_object"}).invoke("hi")


def test_response_format_constrains_the_answer(model):
    schema = City.model_json_schema()
    for fmt in ({"type": "json_schema", "json_schema": {"name": "City", "schema": schema}}, schema, City):
        msg = model.bind(response_format=fmt).invoke("a city")
        City.model_validate_json(msg.content)
    streamed = "".join(c.content for c in model.bind(response_format=City).stream("a city"))
    City.model_validate_json(streamed)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_returns_instances(model, method):
    assert isinstance(model.with_structured_output(City, method=method).invoke("a city"), City)
    as_dict = model.with_structured_output(City.model_json_schema(), method=method).invoke("a city")
    assert isinstance(as_dict, dict) and set(as_dict) == {"name", "big"}
    chunks = list(model.with_structured_output(City, method=method).stream("a city"))
    assert isinstance(chunks[-1], City)


def test_with_structured_output_json_mode_and_include_raw(model, monkeypatch):
    raw = model.with_structured_output(City, include_raw=True).invoke("a city")
    assert isinstance(raw["raw"], AIMessage) and isinstance(raw["parsed"], City) and raw["parsing_error"] is None
    # json_mode with a pydantic schema: constrained to that schema, so it always parses into it
    for _ in range(3):
        out = model.with_structured_output(City, method="json_mode", include_raw=True).invoke("a city")
        assert isinstance(out["parsed"], City) and out["parsing_error"] is None
    assert isinstance(model.with_structured_output(City.model_json_schema(), method="json_mode").invoke("a city"), dict)
    with pytest.raises(ValueError, match="method must be"):
        model.with_structured_output(City, method="xml")


def test_a_small_max_tokens_never_cuts_a_structured_answer(engine):
    """The budget of a structured call is the larger of max_tokens and what the schema needs:
    a bounded object always fits (it used to raise StructuredOutputError at max_tokens=3)."""
    model = ChatKVBoost(engine=engine, max_tokens=3)
    assert isinstance(model.with_structured_output(City).invoke("a city"), City)
    assert isinstance(model.with_structured_output(City, method="json_mode").invoke("a city"), City)
    streamed = list(model.with_structured_output(City).stream("a city"))
    assert isinstance(streamed[-1], City)
    call = model.bind_tools([Add], tool_choice="Add").invoke("add 1 and 2")  # a forced call: the same rule
    Add(**call.tool_calls[0]["args"])
    assert City.model_validate_json(KVBoostLLM(engine=engine, max_tokens=3).invoke("a city", response_format=City))


def test_document_kv_is_reused_under_tools_and_schemas(engine):
    model = ChatKVBoost(engine=engine, max_tokens=60)
    warm_documents(model, DOCS[:2])
    question = documents_to_message(DOCS[:2], "What is the weather in the documents' city?")
    msg = model.bind_tools([WEATHER], tool_choice="get_weather").invoke([question])
    assert msg.tool_calls and msg.usage_metadata["input_token_details"]["cache_read"] > 0
    raw = model.with_structured_output(City, include_raw=True).invoke([question])
    assert isinstance(raw["parsed"], City)
    assert raw["raw"].usage_metadata["input_token_details"]["cache_read"] > 0


# ------------------------------------------------------------------ the text LLM (KVBoostLLM)
def test_text_llm_honours_response_format(engine):
    """KVBoostLLM constrains its answer to a bound or per-call ``response_format`` (the core's
    :func:`kvboost_rag.frameworks.options.response_format_constraint`, as ChatKVBoost): every form parses."""
    llm = KVBoostLLM(engine=engine, max_tokens=60)
    schema = City.model_json_schema()
    for fmt in ({"type": "json_schema", "json_schema": {"name": "City", "schema": schema}}, schema, City):
        City.model_validate_json(llm.bind(response_format=fmt).invoke("a city"))
    City.model_validate_json(llm.invoke("a city", response_format=City))  # a call argument
    City.model_validate_json("".join(llm.bind(response_format=City).stream("a city")))
    for text in llm.bind(response_format=City).batch(["a city", "another city"]):
        City.model_validate_json(text)
    City.model_validate_json(asyncio.run(llm.bind(response_format=City).ainvoke("a city")))
    chat_llm = KVBoostLLM(engine=engine, max_tokens=60, chat_template=True)
    City.model_validate_json(chat_llm.invoke("a city", response_format=City))
    try:  # JSON mode: any object (random weights may run out of budget inside a string)
        json.loads(llm.invoke("a city", response_format={"type": "json_object"}))
    except StructuredOutputError as exc:
        assert "ran out" in str(exc)
    assert llm.invoke("a city", response_format={"type": "text"}) is not None  # plain text, no constraint


def test_text_llm_refuses_what_it_cannot_honour(engine):
    llm = KVBoostLLM(engine=engine, max_tokens=5)
    with pytest.raises(InvalidInputError, match="unsupported response_format"):
        llm.bind(response_format={"type": "xml"}).invoke("hi")
    with pytest.raises(InvalidInputError, match="response_format must be"):
        llm.invoke("hi", response_format=42)
    with pytest.raises(InvalidInputError, match=r"unknown argument\(s\) \['tools'\]"):
        llm.bind(tools=[WEATHER]).invoke("hi")  # no tool calling on the text LLM: never dropped silently
    with pytest.raises(InvalidInputError, match=r"unknown argument\(s\) \['bogus'\]"):
        llm.invoke("hi", response_format=City, bogus=1)


# ------------------------------------------------------------------ streaming tool calls
SCRIPT = ('Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call> and '
          '<tool_call>\n{"name": "Add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')


def _merge(chunks):
    import functools
    import operator

    return functools.reduce(operator.add, chunks)


@pytest.mark.parametrize("mode", ["stream", "astream", "streaming=True"])
def test_streamed_tool_calls_add_up_to_the_invoked_ones(engine, monkeypatch, mode):
    script = ScriptedOutput(engine, monkeypatch, SCRIPT)
    model = ChatKVBoost(engine=engine, max_tokens=200)
    bound = model.bind_tools([Add, WEATHER])
    invoked = bound.invoke("weather in Paris, and 1 + 2?")
    assert [(c["name"], c["args"]) for c in invoked.tool_calls] == [("get_weather", {"city": "Paris"}),
                                                                    ("Add", {"a": 1, "b": 2})]
    assert invoked.content == "Let me look.  and"

    script.reset()
    if mode == "stream":
        chunks = [c for c in bound.stream("weather in Paris, and 1 + 2?")]
    elif mode == "astream":
        async def collect():
            return [c async for c in bound.astream("weather in Paris, and 1 + 2?")]
        chunks = asyncio.run(collect())
    else:  # invoke through the streaming path: LangChain merges the chunks itself
        streaming = ChatKVBoost(engine=engine, max_tokens=200, streaming=True).bind_tools([Add, WEATHER])
        chunks = [streaming.invoke("weather in Paris, and 1 + 2?")]
    merged = chunks[0] if len(chunks) == 1 else _merge(chunks)
    assert merged.tool_calls == invoked.tool_calls  # name, args and id
    assert merged.content == invoked.content
    assert merged.response_metadata["finish_reason"] == "tool_calls"
    assert merged.usage_metadata["output_tokens"] == invoked.usage_metadata["output_tokens"]
    if mode == "streaming=True":
        return
    # Text streams as decoded, and each call comes as soon as its block is closed, in order.
    kinds = [("call", c.tool_call_chunks[0]["name"]) if c.tool_call_chunks else ("text", c.content)
             for c in chunks if c.tool_call_chunks or c.content]
    first, second = kinds.index(("call", "get_weather")), kinds.index(("call", "Add"))
    assert first < second and "".join(k[1] for k in kinds[first + 1:second]) == "  and"
    assert len([k for k in kinds[:first] if k[0] == "text"]) >= 2  # "Let me look." in several chunks
    assert all(len(c.tool_call_chunks) <= 1 for c in chunks) and chunks[-1].chunk_position == "last"


def test_streamed_text_without_calls_is_plain_content(engine, monkeypatch):
    ScriptedOutput(engine, monkeypatch, "No tool is needed here.")
    chunks = list(ChatKVBoost(engine=engine, max_tokens=50).bind_tools([Add]).stream("hi"))
    merged = _merge(chunks)
    assert merged.content == "No tool is needed here." and merged.tool_calls == []
    assert len([c for c in chunks if c.content]) > 1
    assert merged.response_metadata["finish_reason"] == "eos"
