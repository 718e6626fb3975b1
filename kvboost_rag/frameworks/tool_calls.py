"""Tool calling, framework-neutral: one assistant turn with tools, and the calls parsed back.

Why here and not in each integration: the format of a tool call is the model's (its chat
template's), not the framework's. Qwen2.5 / Hermes templates list the tools in the system turn and
expect ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; Llama 3.x templates expect a
bare JSON object ``{"name": ..., "parameters": {...}}``. Integrations convert their tool objects to
JSON schemas, call :func:`generate_tool_calls` (or :func:`render_tools` + ``engine.generate`` +
:func:`parse_tool_calls`), and convert :class:`ToolCall` back.

Documents stay document segments: the tools are rendered by the template, the documents are still
swapped for sentinels (:func:`kvboost_rag.prompt.chat.render_chat`), so their stored KV is reused.

Forced calls (``tool_choice="any"`` / ``"required"`` / a tool name): the call is decoded under a
JSON-schema constraint (:mod:`kvboost_rag.decode.constraints`) ``{"name": <one of the tools>,
"arguments": <that tool's parameters schema>}``, so it always parses, even from a 135M model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from kvboost_rag.decode.constraints import json_schema_constraint
from kvboost_rag.errors import InvalidInputError
from kvboost_rag.frameworks.options import MarkedPrompt, constrained_kwargs
from kvboost_rag.frameworks.tool_call_parser import parse_tool_calls, scan
from kvboost_rag.prompt.segments import Segment
from kvboost_rag.prompt.tools import (FORCED_CHOICES, ParsedToolCalls, ToolCall, ToolChatResult, normalize_tools,  # noqa: F401
                                      tool_call_style)

__all__ = ["parse_tool_calls", "tool_call_schema", "tool_call_constraint", "generate_tool_calls", "ToolTurn",
           "ToolCallStream", "prepare_tool_turn", "forced_choice", "ToolCall", "ParsedToolCalls", "ToolChatResult"]

# ------------------------------------------------------------------ forced calls
def _chosen(tools: list[dict], tool_choice: Any) -> list[dict]:
    if tool_choice in FORCED_CHOICES:
        return tools
    name = tool_choice
    if isinstance(tool_choice, dict):  # {"type": "function", "function": {"name": ...}} or {"name": ...}
        name = (tool_choice.get("function") or tool_choice).get("name")
    picked = [t for t in tools if t["function"]["name"] == name]
    if not picked:
        names = [t["function"]["name"] for t in tools]
        raise InvalidInputError(f"tool_choice {tool_choice!r} names no tool; tools: {names}, or 'any' / 'required'")
    return picked


def tool_call_schema(tools: Sequence[Any], tool_choice: Any = "any") -> dict:
    """The JSON schema of one call of the chosen tool(s): ``{"name": <tool>, "arguments": <its
    parameters>}``, one ``anyOf`` branch per tool so each name carries its own arguments."""
    branches = [{"type": "object",
                 "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                "arguments": t["function"]["parameters"]},
                 "required": ["name", "arguments"]}
                for t in _chosen(normalize_tools(tools), tool_choice)]
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def tool_call_constraint(tools: Sequence[Any], tool_choice: Any = "any"):
    """A :class:`~kvboost_rag.decode.constraints.Constraint` for :func:`tool_call_schema`."""
    return json_schema_constraint(tool_call_schema(tools, tool_choice))


# Text that opens a call in each style, appended after the generation prompt in forced mode so
# the model is "inside" a call when the constrained JSON starts.
_CALL_OPENER = {"hermes": "<tool_call>\n", "llama3": "", "json": ""}


def forced_choice(tool_choice: Any) -> bool:
    """Whether ``tool_choice`` forces a call (``"any"`` / ``"required"`` / ``True`` / a tool name / a
    ``{"type": "function", "function": {"name": ...}}`` dict) rather than leaving it to the model."""
    return tool_choice not in (None, False, "auto", "none")


@dataclass
class ToolTurn:
    """A prepared assistant turn with tools: what to generate (``segments``, ``constraint``, or
    ``None`` when the model decides) and how to read the answer back (:meth:`finish`). The
    streaming form of :func:`generate_tool_calls`: pass ``segments`` and ``constraint`` to
    ``engine.stream`` and call :meth:`finish` with the final text, or feed the deltas to
    :meth:`stream` to get the text and the calls as they complete. ``tool_names``: the bound
    tools (JSON naming another tool is text); ``None`` accepts any name."""

    segments: list
    constraint: Any
    style: str
    tool_choice: Any
    tool_names: Optional[tuple] = None

    @property
    def forced(self) -> bool:
        return self.constraint is not None

    def finish(self, text: str, parsed_json: Any = None) -> ParsedToolCalls:
        """The calls in the answer ``text`` (``parsed_json``: ``result.extra["json"]`` in forced mode)."""
        if self.forced:
            obj = parsed_json if parsed_json is not None else json.loads(text)
            return ParsedToolCalls([ToolCall(obj["name"], obj["arguments"])], "")
        if self.tool_choice == "none":
            return ParsedToolCalls([], text.strip())
        return parse_tool_calls(text, self.style, self.tool_names)

    def stream(self) -> "ToolCallStream":
        """An incremental reader of this turn's answer (:class:`ToolCallStream`): text and calls as
        the deltas arrive, adding up to what :meth:`finish` returns for the whole text."""
        return ToolCallStream(self)


class ToolCallStream:
    """Incremental :meth:`ToolTurn.finish` for streaming: feed the answer's text deltas, get back
    events as soon as they are known, in order: ``str`` (text outside tool calls, to stream as
    content) and :class:`ToolCall` (a call, once its text is complete).

    What the events add up to is what :meth:`ToolTurn.finish` returns for the whole text (the
    text events joined equal its ``content``, stripped the same way; the calls, its
    ``tool_calls``): the same reader (:func:`parse_tool_calls`' every form) runs on the text not
    yet decided, and stops where more text could change the decision.

    * text streams as it comes; what may open a call (``<tool_call>``, ``<|python_tag|>``, a code
      fence, ``{"``, ``[{``, or a partial one at the end of the text so far) is held back until its
      JSON balances (or, for a block, its closing tag arrives), then comes out as a call or as text;
      an unclosed last block or bare JSON is decided at :meth:`close`. Trailing whitespace is held
      back until more content follows.
    * a forced ``tool_choice`` (the answer is the call's JSON): the call at :meth:`close`;
      ``tool_choice="none"``: all text.
    """

    def __init__(self, turn: "ToolTurn") -> None:
        self.turn = turn
        self._names = frozenset(turn.tool_names) if turn.tool_names is not None else None
        self._all: list[str] = []
        self._pending = ""  # text not yet decided
        self._after_call = False  # the text so far ended with a call (a ";" after it is dropped)
        self._started = False  # some content was emitted (leading whitespace is dropped before)
        self._held_ws = ""  # trailing whitespace, emitted only if more content follows
        self._closed = False
        self.tool_calls: list[ToolCall] = []

    @property
    def _all_text(self) -> str:
        return "".join(self._all)

    def _text(self, text: str) -> list:
        """Content ``text``, stripped at the ends of the whole content as :func:`parse_tool_calls` does."""
        combined = self._held_ws + text
        if not self._started:
            combined = combined.lstrip()
        body = combined.rstrip()
        self._held_ws = combined[len(body):]
        if not body:
            return []
        self._started = True
        return [body]

    def _call(self, call: ToolCall) -> list:
        self.tool_calls.append(call)
        return [call]

    def _read(self, final: bool) -> list:
        events, consumed, self._after_call = scan(self._pending, self._names, final, self._after_call)
        self._pending = self._pending[consumed:]
        out: list = []
        for event in events:
            out += self._text(event) if isinstance(event, str) else self._call(event)
        return out

    def feed(self, delta: str) -> list:
        """Events made known by the next text ``delta``."""
        if self._closed:
            raise InvalidInputError("ToolCallStream: feed() after close()")
        self._all.append(delta)
        turn = self.turn
        if turn.forced:
            return []
        if turn.tool_choice == "none":
            return self._text(delta)
        self._pending += delta
        return self._read(final=False)

    def close(self, parsed_json: Any = None) -> list:
        """The events left once the answer is complete (``parsed_json``: ``result.extra["json"]``
        in forced mode). Trailing whitespace held back is dropped."""
        if self._closed:
            return []
        self._closed = True
        turn, out = self.turn, []
        if turn.forced:
            parsed = turn.finish(self._all_text, parsed_json)
            for call in parsed.tool_calls:
                out += self._call(call)
            out += self._text(parsed.content)
        elif turn.tool_choice != "none":
            out = self._read(final=True)
        self._held_ws = ""
        return out


def prepare_tool_turn(engine, messages: Sequence[dict], tools: Sequence[Any], tool_choice: Any = "auto") -> ToolTurn:
    """Render ``messages`` with ``tools`` (:class:`ToolsNotSupportedError` if the template has no
    tool support) and, for a forced ``tool_choice``, the constraint of the call and the text that
    opens it in the template's style. ``True`` is taken as ``"any"``, ``False`` as ``"auto"``."""
    if tool_choice is True:
        tool_choice = "any"
    elif tool_choice is False:
        tool_choice = "auto"
    normalized = normalize_tools(tools)
    # a MarkedPrompt: write-behind takes no block of the tool instructions the template adds for a document
    segments = MarkedPrompt(engine.chat_segments(messages, tools=normalized))
    style = tool_call_style(engine.tokenizer)
    names = tuple(t["function"]["name"] for t in normalized)
    if not forced_choice(tool_choice):
        return ToolTurn(segments, None, style, tool_choice, names)
    constraint = tool_call_constraint(normalized, tool_choice)
    if _CALL_OPENER[style]:
        segments.append(Segment("text", _CALL_OPENER[style]))
    return ToolTurn(segments, constraint, style, tool_choice, names)


def generate_tool_calls(engine, messages: Sequence[dict], tools: Sequence[Any], *, tool_choice: Any = "auto",
                        **generate_kwargs) -> ToolChatResult:
    """One assistant turn with ``tools`` available.

    ``tool_choice``: ``"auto"`` / None (the model decides; calls are parsed from its text),
    ``"none"`` (tools shown, nothing parsed), ``"any"`` / ``"required"`` (exactly one call of some
    tool, constrained) or a tool name / ``{"type": "function", "function": {"name": ...}}`` (one
    call of that tool, constrained). ``generate_kwargs`` go to ``engine.generate``; in the forced
    modes through :func:`~kvboost_rag.frameworks.options.constrained_kwargs` (``stop`` yields to
    the grammar, which ends the call). Streaming: :func:`prepare_tool_turn`."""
    turn = prepare_tool_turn(engine, messages, tools, tool_choice)
    result = engine.generate(turn.segments, **constrained_kwargs(generate_kwargs, turn.constraint, engine=engine,
                                                                   prompt=turn.segments))
    parsed = turn.finish(result.text, result.extra.get("json"))  # the parsed call in forced mode
    return ToolChatResult(parsed.content, parsed.tool_calls, result)
