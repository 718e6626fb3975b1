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
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from kvboost_rag.decode.constraints import json_schema_constraint
from kvboost_rag.errors import InvalidInputError
from kvboost_rag.frameworks.options import constrained_kwargs
from kvboost_rag.prompt.segments import Segment
from kvboost_rag.prompt.tools import (FORCED_CHOICES, ParsedToolCalls, ToolCall, ToolChatResult, normalize_tools,  # noqa: F401
                                      tool_call_style)

__all__ = ["parse_tool_calls", "tool_call_schema", "tool_call_constraint", "generate_tool_calls", "ToolTurn",
           "ToolCallStream", "prepare_tool_turn", "forced_choice", "ToolCall", "ParsedToolCalls", "ToolChatResult"]

# ------------------------------------------------------------------ parsing
_CALL_TAGS = ("<tool_call>", "</tool_call>")  # hermes style: a call's opening and closing tags
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def _as_call(obj: Any) -> Optional[ToolCall]:
    if not isinstance(obj, dict):
        return None
    if obj.get("type") == "function" and isinstance(obj.get("function"), dict):
        obj = obj["function"]
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters"))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    return ToolCall(name, args)


def parse_tool_calls(text: str, style: str = "hermes") -> ParsedToolCalls:
    """Find the tool calls in generated ``text`` written in ``style`` (:func:`tool_call_style`).

    hermes: every ``<tool_call>{json}</tool_call>`` block (an unclosed last block too); the rest
    is the content. llama3 / json: the text (after an optional ``<|python_tag|>`` or code fence)
    is one or more JSON objects with ``name`` and ``parameters``/``arguments`` separated by ``;``
    or whitespace; otherwise it is all content. A block that does not parse stays in the content."""
    if style not in ("hermes", "llama3", "json"):
        raise InvalidInputError(f"unknown tool-call style {style!r}; one of hermes, llama3, json")
    calls: list[ToolCall] = []
    if style == "hermes":
        kept, last = [], 0
        for m in _HERMES.finditer(text):
            call = _as_call(_loads(m.group(1)))
            if call is None:
                continue
            calls.append(call)
            kept.append(text[last:m.start()])
            last = m.end()
        kept.append(text[last:])
        return ParsedToolCalls(calls, "".join(kept).strip())
    body = text.strip().removeprefix("<|python_tag|>").strip()
    fenced = _FENCE.match(body)
    body = fenced.group(1) if fenced else body
    decoder, pos = json.JSONDecoder(), 0
    while pos < len(body) and body[pos] == "{":
        try:
            obj, end = decoder.raw_decode(body, pos)
        except ValueError:
            break
        call = _as_call(obj)
        if call is None:
            break
        calls.append(call)
        pos = end
        while pos < len(body) and body[pos] in "; \n\t\r":
            pos += 1
    if not calls:
        return ParsedToolCalls([], text.strip())
    return ParsedToolCalls(calls, body[pos:].strip())


def _loads(s: str) -> Any:
    try:
        return json.loads(s)
    except ValueError:
        return None


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
    :meth:`stream` to get the text and the calls as they complete."""

    segments: list
    constraint: Any
    style: str
    tool_choice: Any

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
        return parse_tool_calls(text, self.style)

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
    ``tool_calls``):

    * hermes style (``<tool_call>{json}</tool_call>``): text streams as it comes; a call is emitted
      when its closing tag arrives (an unclosed last block at :meth:`close`); a block that does not
      parse as a call is text, as in :func:`parse_tool_calls`. A possible partial ``<tool_call>``
      at the end of the text so far, and trailing whitespace, are held back until known.
    * llama3 / json styles (a bare JSON call at the start): an answer whose first visible text can
      open a call (``{``, ``<|python_tag|>``, a code fence) is read whole at :meth:`close`; any other
      answer is text and streams as it comes.
    * a forced ``tool_choice`` (the answer is the call's JSON): the call at :meth:`close`;
      ``tool_choice="none"``: all text.
    """

    _OPENERS = ("{", "<|python_tag|>", "```")

    def __init__(self, turn: "ToolTurn") -> None:
        self.turn = turn
        self._all: list[str] = []
        self._pending = ""  # hermes: text not yet classified
        self._in_block = False  # hermes: _pending starts with an opening tag
        self._mode: Optional[str] = None  # json styles: None (undecided), "text" or "whole"
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
        if turn.style == "hermes":
            self._pending += delta
            return self._hermes()
        if self._mode == "text":
            return self._text(delta)
        if self._mode is None:
            head = self._all_text.lstrip()
            if not head:
                return []
            if any(head.startswith(o) for o in self._OPENERS):
                self._mode = "whole"
            elif not any(o.startswith(head) for o in self._OPENERS):
                self._mode = "text"
                return self._text(self._all_text)
        return []

    def _hermes(self) -> list:
        out: list = []
        opener, closer = _CALL_TAGS
        while True:
            if not self._in_block:
                i = self._pending.find(opener)
                if i >= 0:
                    out += self._text(self._pending[:i])
                    self._pending, self._in_block = self._pending[i:], True
                    continue
                keep = next((k for k in range(min(len(opener) - 1, len(self._pending)), 0, -1)
                             if self._pending.endswith(opener[:k])), 0)
                cut = len(self._pending) - keep
                out += self._text(self._pending[:cut])
                self._pending = self._pending[cut:]
                return out
            j = self._pending.find(closer, len(opener))
            if j < 0:
                return out
            block, self._pending = self._pending[:j + len(closer)], self._pending[j + len(closer):]
            self._in_block = False
            call = _as_call(_loads(block[len(opener):-len(closer)].strip()))
            out += self._call(call) if call is not None else self._text(block)

    def close(self, parsed_json: Any = None) -> list:
        """The events left once the answer is complete (``parsed_json``: ``result.extra["json"]``
        in forced mode). Trailing whitespace held back is dropped."""
        if self._closed:
            return []
        self._closed = True
        turn, out = self.turn, []
        if turn.forced or (turn.style != "hermes" and turn.tool_choice != "none" and self._mode != "text"):
            parsed = turn.finish(self._all_text, parsed_json)
            for call in parsed.tool_calls:
                out += self._call(call)
            out += self._text(parsed.content)
        elif turn.style == "hermes" and turn.tool_choice != "none":
            opener = _CALL_TAGS[0]
            call = _as_call(_loads(self._pending[len(opener):].strip())) if self._in_block else None
            out += self._call(call) if call is not None else self._text(self._pending)
            self._pending, self._in_block = "", False
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
    segments = list(engine.chat_segments(messages, tools=normalized))
    style = tool_call_style(engine.tokenizer)
    if not forced_choice(tool_choice):
        return ToolTurn(segments, None, style, tool_choice)
    constraint = tool_call_constraint(normalized, tool_choice)
    if _CALL_OPENER[style]:
        segments.append(Segment("text", _CALL_OPENER[style]))
    return ToolTurn(segments, constraint, style, tool_choice)


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
    result = engine.generate(turn.segments, **constrained_kwargs(generate_kwargs, turn.constraint))
    parsed = turn.finish(result.text, result.extra.get("json"))  # the parsed call in forced mode
    return ToolChatResult(parsed.content, parsed.tool_calls, result)
