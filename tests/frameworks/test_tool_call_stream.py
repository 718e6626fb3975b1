"""kvboost_rag.prompt.tools.ToolCallStream: tool calls read incrementally from streamed text (issue 13).

Whatever way the answer is cut into deltas, the text events joined equal ``ToolTurn.finish``'s
content and the call events equal its calls; calls and text come out as soon as they are known.
"""
from __future__ import annotations

import pytest

from kvboost_rag.frameworks.tool_calls import ToolCall, ToolCallStream, ToolTurn

HERMES_TEXTS = [
    "Sure.",
    "",
    "\n\n  hello \n world  \n",
    '<tool_call>\n{"name": "Add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
    'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
    '<tool_call>{"name": "Add", "arguments": {"a": 1}}</tool_call> done  ',
    '  <tool_call>not json</tool_call> text <tool_call>{"name": "Add", "arguments": {}}</tool_call>',
    "a < b <tool_ and <tool_call",
    'x <tool_call>{"name": "Add", "arguments": {"a": 1}}',  # unclosed last block: still a call
    'x <tool_call>{"name": ',  # unclosed, not JSON: text
    '<tool_call>{"name": "A", "arguments": {"s": "<tool_call>"}}</tool_call>',
    '<tool_call>{"name": "A", "arguments": {"s": "</tool_call>"}}</tool_call>',  # cut at the first closer
    '<tool_call>{"type": "function", "function": {"name": "A", "arguments": "{\\"x\\": 1}"}}</tool_call>',
    "<tool_call><tool_call>{\"name\": \"A\", \"arguments\": {}}</tool_call>",
]
JSON_TEXTS = [
    '{"name": "Add", "parameters": {"a": 1}}; {"name": "B", "parameters": {}} trailing',
    '<|python_tag|>{"name": "Add", "parameters": {"a": 1}}',
    '```json\n{"name": "Add", "arguments": {"a": 1}}\n```',
    'Hello {"name": "Add", "parameters": {"a": 1}}',
    "  ` not a fence ",
    "{not json",
    "```",
    "  ",
    "<|python",
    # forms small models write whatever their template asks (bare, fenced, listed JSON)
    '{"name": "Add", "arguments": {"a": 1}}',
    '```json\n{\n  "name": "Add",\n  "arguments": {"a": 1}\n}\n``` and more',
    '```json\n{"name": "Add", "arguments": {"a": 1}}',
    '[{"name": "Add", "arguments": {"a": 1}}, {"name": "B", "arguments": {}}]; after',
    'x {"answer": {"name": "Add", "arguments": {}}} y [1, 2] {"s": "}"} {"name": "Nope", "arguments": {}}',
    '<tool_call>\n```json\n{"name": "Add", "arguments": {}}\n```\n</tool_call>',
    "```python\nprint({'a': 1})\n```",
    '{"name": "Add", "arguments": {"a": "unclosed',
]


def _splits(text: str):
    yield [text]
    yield list(text)  # one character per delta
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
    yield [text[i:i + 3] for i in range(0, len(text), 3)]


def _run(turn: ToolTurn, deltas: list, parsed_json=None):
    stream = turn.stream()
    fed = [e for d in deltas for e in stream.feed(d)]
    return fed, stream.close(parsed_json)


def _check(turn: ToolTurn, text: str):
    expected = turn.finish(text)
    for deltas in _splits(text):
        fed, closed = _run(turn, deltas)
        events = fed + closed
        assert "".join(e for e in events if isinstance(e, str)) == expected.content, (text, deltas)
        calls = [(c.name, c.arguments) for c in events if isinstance(c, ToolCall)]
        assert calls == [(c.name, c.arguments) for c in expected.tool_calls], (text, deltas)
        assert all(e for e in events if isinstance(e, str))  # no empty text events


@pytest.mark.parametrize("text", HERMES_TEXTS)
@pytest.mark.parametrize("choice", ["auto", "none"])
def test_hermes_stream_adds_up_to_finish(text, choice):
    _check(ToolTurn([], None, "hermes", choice), text)


@pytest.mark.parametrize("text", JSON_TEXTS + HERMES_TEXTS[:3])
@pytest.mark.parametrize("style", ["llama3", "json"])
def test_json_styles_stream_adds_up_to_finish(text, style):
    _check(ToolTurn([], None, style, "auto"), text)


@pytest.mark.parametrize("text", JSON_TEXTS + HERMES_TEXTS)
@pytest.mark.parametrize("style", ["hermes", "json"])
def test_every_form_streams_as_finish_reads_it_with_bound_names(text, style):
    """Every form in every style, with the bound tools' names (JSON naming another is text)."""
    _check(ToolTurn([], None, style, "auto", ("Add", "get_weather")), text)


def test_a_bare_json_call_comes_out_when_its_json_completes():
    """Qwen2.5-Coder's bare call under a Hermes template: held back while written, a call (not
    content) as soon as its braces balance."""
    text = 'Checking. {"name": "Add", "arguments": {"a": 1}} Done.'
    stream = ToolTurn([], None, "hermes", "auto", ("Add",)).stream()
    seen: list = []
    end = text.index("}}") + 2
    for i, ch in enumerate(text):
        seen += stream.feed(ch)
        if i == end - 1:
            assert isinstance(seen[-1], ToolCall) and seen[-1].arguments == {"a": 1}
            assert "".join(e for e in seen if isinstance(e, str)) == "Checking."
    seen += stream.close()
    assert "".join(e for e in seen if isinstance(e, str)) == "Checking.  Done."  # as finish() reads it


def test_hermes_calls_and_text_come_out_as_soon_as_known():
    text = HERMES_TEXTS[4]
    stream = ToolTurn([], None, "hermes", "auto").stream()
    seen: list = []
    first_closer = text.index("</tool_call>") + len("</tool_call>")
    for i, ch in enumerate(text):
        events = stream.feed(ch)
        seen += events
        if i == len("Let me check.") - 1:
            assert "".join(seen) == "Let me check."  # text streams before any call
        if i == first_closer - 1:
            assert isinstance(seen[-1], ToolCall) and seen[-1].name == "get_weather"  # the call, at its closer
    assert [e.name for e in seen if isinstance(e, ToolCall)] == ["get_weather", "Add"]
    assert stream.close() == [] and stream.tool_calls == [e for e in seen if isinstance(e, ToolCall)]


def test_plain_answers_stream_as_text_in_the_json_styles():
    stream = ToolTurn([], None, "llama3", "auto").stream()
    assert stream.feed("  Hel") == ["Hel"] and stream.feed("lo ") == ["lo"] and stream.feed("you") == [" you"]
    assert stream.close() == []


def test_forced_call_comes_at_close_from_the_parsed_json():
    turn = ToolTurn([], object(), "hermes", "Add")
    text = '{"name": "Add", "arguments": {"a": 1, "b": 2}}'
    fed, closed = _run(turn, list(text), {"name": "Add", "arguments": {"a": 1, "b": 2}})
    assert fed == [] and len(closed) == 1 and (closed[0].name, closed[0].arguments) == ("Add", {"a": 1, "b": 2})
    _, closed = _run(turn, [text])  # without the parsed value: the text is parsed
    assert closed[0].arguments == {"a": 1, "b": 2}


def test_close_is_final():
    stream = ToolTurn([], None, "hermes", "auto").stream()
    stream.feed("hi ")
    assert stream.close() == [] and stream.close() == []
    with pytest.raises(Exception, match="after close"):
        stream.feed("more")
