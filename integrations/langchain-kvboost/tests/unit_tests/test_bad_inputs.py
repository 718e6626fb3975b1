"""Bad inputs to the LangChain classes are refused with a KVBoostError naming the value and the
fix, before the engine generates anything."""
import asyncio

import pytest

from kvboost_rag.errors import InvalidConfigError, InvalidInputError, KVBoostError
from langchain_kvboost import ChatKVBoost, KVBoostLLM


def _counting(engine, monkeypatch):
    calls = []
    real = engine.stream
    monkeypatch.setattr(engine, "stream", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("cls", [ChatKVBoost, KVBoostLLM])
@pytest.mark.parametrize("stop", [[""], ["Answer", ""]])
def test_an_empty_stop_string_is_refused(cls, stop, tiny_engine):
    model = cls(engine=tiny_engine, max_tokens=2)
    with pytest.raises(InvalidInputError, match="empty string"):
        model.invoke("Hello", stop=stop)
    with pytest.raises(InvalidInputError, match="empty string"):
        cls(engine=tiny_engine, max_tokens=2, stop=[""]).invoke("Hello")


@pytest.mark.parametrize("cls", [ChatKVBoost, KVBoostLLM])
def test_negative_max_retries_is_refused_at_construction(cls, tiny_engine):
    with pytest.raises(InvalidConfigError, match="max_retries must be >= 0, got -1"):
        cls(engine=tiny_engine, max_retries=-1)
    with pytest.raises(InvalidConfigError, match="max_retries"):
        cls.from_model_id("some/model", max_retries=-3)
    assert cls(engine=tiny_engine, max_retries=2).max_retries == 2


@pytest.mark.parametrize("tools, words", [
    ([5], "tool 0 is a int 5, not a tool"),
    ("garbage", "takes a list of tools, got a str 'garbage'"),
    ({"name": "f"}, "takes a list of tools, got a dict"),
    ([{"type": "function", "function": {"name": "ok", "parameters": {"type": "object", "properties": {}}}}, None],
     "tool 1 is a NoneType"),
])
def test_bind_tools_refuses_what_is_not_a_list_of_tools(tools, words, tiny_engine):
    with pytest.raises(InvalidInputError, match=words):
        ChatKVBoost(engine=tiny_engine).bind_tools(tools)


def test_tool_choice_without_tools_is_refused_before_generating(tiny_engine, monkeypatch):
    calls = _counting(tiny_engine, monkeypatch)
    chat = ChatKVBoost(engine=tiny_engine, max_tokens=2)
    for choice in ("required", "any", "get_weather"):
        with pytest.raises(InvalidConfigError, match="without tools.*bind_tools"):
            chat.invoke("hi", tool_choice=choice)
    assert calls == []


@pytest.mark.parametrize("cls", [ChatKVBoost, KVBoostLLM])
@pytest.mark.parametrize("concurrency", [0, -1, 1.5, "2"])
def test_batch_max_concurrency_must_be_a_positive_integer(cls, concurrency, tiny_engine, monkeypatch):
    calls = _counting(tiny_engine, monkeypatch)
    model = cls(engine=tiny_engine, max_tokens=1)
    with pytest.raises(InvalidConfigError, match="max_concurrency"):
        model.batch(["a", "b"], config={"max_concurrency": concurrency})
    with pytest.raises(InvalidConfigError, match="max_concurrency"):
        asyncio.run(asyncio.wait_for(model.abatch(["a", "b"], config={"max_concurrency": concurrency}), 30))
    with pytest.raises(InvalidConfigError, match="max_concurrency"):
        model.batch(["a", "b"], config=[{}, {"max_concurrency": concurrency}])
    assert calls == []
    assert len(model.batch(["a", "b"], config={"max_concurrency": 1})) == 2


def test_errors_are_kvboost_errors_and_value_errors(tiny_engine):
    with pytest.raises(KVBoostError) as info:
        ChatKVBoost(engine=tiny_engine).invoke("hi", tool_choice="required")
    assert isinstance(info.value, ValueError)  # callers catching ValueError still do
