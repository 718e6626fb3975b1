"""Reading tool calls back from generated text, whole or as it streams.

What a model writes when it calls a tool does not always follow its chat template: small models
often drop the template's wrapper (Qwen2.5-Coder-0.5B answers a Hermes template with a bare JSON
object, or one in a code fence). So :func:`parse_tool_calls` reads every form in every style, and
the streaming reader (:class:`kvboost_rag.frameworks.tool_calls.ToolCallStream`) runs the same
scanner (:func:`scan`) on the text not yet decided, so reading a text in pieces gives what reading
it whole gives.
"""
from __future__ import annotations

import json
import re
from typing import Any, Optional, Sequence

from kvboost_rag.errors import InvalidInputError
from kvboost_rag.prompt.tools import ParsedToolCalls, ToolCall

__all__ = ["parse_tool_calls", "scan"]
# What a model writes when it calls a tool, whatever its template asked for: small models often
# drop the template's wrapper (Qwen2.5-Coder-0.5B answers a Hermes template with a bare JSON object,
# or with one in a ```json fence). So every form is read in every style:
#   <tool_call>{json}</tool_call>       Hermes / Qwen2.5 (an unclosed last block too)
#   <|python_tag|>{json}                Llama 3.x
#   ```json\n{json}\n```                a code fence holding only the call(s)
#   {json} / [{json}, ...]              a bare object or list, anywhere in the text
# where {json} is {"name": ..., "arguments"|"parameters": {...}} (or the OpenAI form
# {"type": "function", "function": {...}}). Bare, fenced and tagged JSON only counts when its
# name is one of the bound tools (``tool_names``), so an answer that merely contains JSON stays text.
_CALL_TAGS = ("<tool_call>", "</tool_call>")  # hermes style: a call's opening and closing tags
_PYTHON_TAG = "<|python_tag|>"
_FENCE = "```"
_FENCE_OPEN = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*(?:\r?\n)?")
_FENCED_BODY = re.compile(r"^```[A-Za-z0-9_+-]*\s*(.*?)\s*```$", re.DOTALL)
_WS = " \t\r\n"


def _as_call(obj: Any, names: Optional[frozenset] = None) -> Optional[tuple[str, dict]]:
    """``obj`` as a call ``(name, arguments)``, or None. With ``names`` (the bound tools), only a
    call of one of them. (A :class:`ToolCall`, with its new id, is made only when a call is read
    for good: a stream may look at a call being written several times.)"""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict) and "name" not in obj:
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name or (names is not None and name not in names):
        return None
    if "arguments" in obj or "parameters" in obj:
        args = obj.get("arguments", obj.get("parameters"))
    elif names is not None and set(obj) <= {"name", "type", "id"}:
        args = {}  # a bound tool called with no arguments, written without the key
    else:
        return None
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return name, args


def _as_calls(value: Any, names: Optional[frozenset]) -> Optional[list]:
    """A JSON value as the ``(name, arguments)`` of the calls it writes (an object, or a non-empty
    list of them), or None."""
    items = value if isinstance(value, list) else [value]
    calls = [_as_call(item, names) for item in items]
    return calls if calls and all(c is not None for c in calls) else None


def _loads(s: str) -> Any:
    try:
        return json.loads(s)
    except ValueError:
        return None


def _body_calls(body: str, names: Optional[frozenset]) -> Optional[list]:
    """The calls of a ``<tool_call>`` block's body (JSON, maybe fenced), or None."""
    body = body.strip()
    fenced = _FENCED_BODY.match(body)
    return _as_calls(_loads(fenced.group(1) if fenced else body), names)


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _value_end(text: str, start: int) -> Optional[int]:
    """End of the bracketed JSON value opening at ``text[start]`` (``{`` or ``[``): the index after
    its balanced closing bracket, ``-1`` if the brackets cannot balance (a mismatched closer), or
    None if the text ends first. Strings (and escapes in them) are skipped."""
    depth, in_string, escaped = 0, False, False
    pairs = {"{": "}", "[": "]"}
    stack: list = []
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in pairs:
            stack.append(pairs[ch])
            depth += 1
        elif ch in "}]":
            if not stack or stack.pop() != ch:
                return -1
            depth -= 1
            if depth == 0:
                return i + 1
    return None


class _Hold(Exception):
    """The scan needs more text to decide what starts at this position (streaming only)."""


def _bare_value(text: str, start: int, final: bool, names) -> Optional[tuple[int, Any, Optional[list]]]:
    """The JSON value opening at ``text[start]``: ``(end, value, calls)``, or None when it is not
    one (the opening bracket is then text). Raises :class:`_Hold` when more text could decide."""
    k = _skip_ws(text, start + 1)
    if k >= len(text):
        if final:
            return None
        raise _Hold
    if text[k] != ('"' if text[start] == "{" else "{"):  # a call object has keys; a call list, objects
        return None
    end = _value_end(text, start)
    if end is None:
        if final:
            return None
        raise _Hold
    if end < 0:
        return None
    try:
        value = json.loads(text[start:end])
    except ValueError:
        return None
    return end, value, _as_calls(value, names)


def _partial(text: str, j: int, token: str) -> bool:
    """Whether ``text[j:]`` is a proper prefix of ``token`` (it may still become it)."""
    rest = text[j:]
    return len(rest) < len(token) and token.startswith(rest)


def scan(text: str, names: Optional[frozenset], final: bool, after_call: bool = False):
    """Read ``text`` from its start: ``(events, consumed, after_call)``.

    ``events``: ``str`` (text) and :class:`ToolCall`, in order. ``final=False`` (streaming): stop
    at the first position that more text could still change (a call being written, a partial
    opener), ``consumed`` is where; ``final=True`` decides everything (``consumed == len(text)``).
    Decisions depend only on the text up to where they are made, so reading a text in pieces
    gives what reading it whole gives. ``after_call``: a ``;`` right after a call (Llama 3 writes
    ``{call}; {call}``) is dropped with the whitespace before it."""
    events: list = []
    i, n = 0, len(text)

    def emit_calls(calls: list) -> None:
        events.extend(ToolCall(name, args) for name, args in calls)

    def emit_text(s: str) -> None:
        if s:
            if events and isinstance(events[-1], str):
                events[-1] += s
            else:
                events.append(s)

    try:
        while i < n:
            if after_call:
                k = _skip_ws(text, i)
                if k >= n and not final:
                    raise _Hold
                after_call = False
                if k < n and text[k] == ";":
                    i = k + 1
                    continue
            j = i
            while j < n and text[j] not in "<`{[":
                j += 1
            emit_text(text[i:j])
            i = j
            if i >= n:
                break
            ch = text[i]
            if ch == "<":
                if text.startswith(_CALL_TAGS[0], i):
                    end, calls = _hermes_block(text, i, final, names)
                    if calls is None:
                        emit_text(text[i:end])  # not a call: the block is text
                    else:
                        emit_calls(calls)
                    i = end
                    continue
                if text.startswith(_PYTHON_TAG, i):
                    k = _skip_ws(text, i + len(_PYTHON_TAG))
                    if k < n and text[k] in "{[":
                        found = _bare_value(text, k, final, names)
                        if found is not None and found[2] is not None:
                            emit_calls(found[2])
                            i, after_call = found[0], True
                            continue
                    elif k >= n and not final:
                        raise _Hold
                    emit_text(_PYTHON_TAG)
                    i += len(_PYTHON_TAG)
                    continue
                if not final and (_partial(text, i, _CALL_TAGS[0]) or _partial(text, i, _PYTHON_TAG)):
                    raise _Hold
                emit_text(ch)
                i += 1
                continue
            if ch == "`":
                if text.startswith(_FENCE, i):
                    m = _FENCE_OPEN.match(text, i)
                    k = _skip_ws(text, m.end())
                    if k >= n and not final:
                        raise _Hold  # the fence's language or first line is still coming
                    if k < n and text[k] in "{[":
                        found = _bare_value(text, k, final, names)
                        if found is not None and found[2] is not None:
                            end = _skip_ws(text, found[0])
                            if not final and (end >= n or _partial(text, end, _FENCE)):
                                raise _Hold  # the closing fence may follow
                            emit_calls(found[2])
                            i = end + len(_FENCE) if text.startswith(_FENCE, end) else found[0]
                            after_call = True
                            continue
                    emit_text(_FENCE)
                    i += len(_FENCE)
                    continue
                if not final and _partial(text, i, _FENCE):
                    raise _Hold
                emit_text(ch)
                i += 1
                continue
            found = _bare_value(text, i, final, names)  # "{" or "["
            if found is None:
                emit_text(ch)
                i += 1
            elif found[2] is None:  # JSON, not a call: text as a whole (a call nested in it is no call)
                emit_text(text[i:found[0]])
                i = found[0]
            else:
                emit_calls(found[2])
                i, after_call = found[0], True
    except _Hold:
        pass
    return events, i, after_call


def _hermes_block(text: str, start: int, final: bool, names) -> tuple[int, Optional[list]]:
    """The ``<tool_call>`` block at ``start``: ``(end, calls)``, calls None if the block is
    text. Its JSON ends where its brackets balance (so a string holding ``</tool_call>`` does not cut
    it); JSON that does not parse as a call is cut at the first closing tag, as text; an unclosed
    last block is read to the end of the text."""
    opener, closer = _CALL_TAGS
    n = len(text)
    k = _skip_ws(text, start + len(opener))
    if k < n and text[k] in "{[":
        found = _bare_value(text, k, final, names)
        if found is not None and found[2] is not None:
            end = _skip_ws(text, found[0])
            if text.startswith(closer, end):
                return end + len(closer), found[2]
            if end >= n or _partial(text, end, closer):
                if not final:
                    raise _Hold
                if end >= n:  # an unclosed last block: still a call
                    return n, found[2]
    elif k >= n and not final:
        raise _Hold
    close = text.find(closer, start + len(opener))
    if close < 0:
        if not final:
            raise _Hold
        return n, _body_calls(text[start + len(opener):], names)
    end = close + len(closer)
    return end, _body_calls(text[start + len(opener):close], names)


def parse_tool_calls(text: str, style: str = "hermes", tool_names: Optional[Sequence[str]] = None) -> ParsedToolCalls:
    """Find the tool calls in generated ``text``: every form a model writes a call in (Hermes
    ``<tool_call>`` blocks, an unclosed last one too; ``<|python_tag|>`` JSON; a code fence holding
    the call; bare JSON objects or lists of ``{"name", "arguments"|"parameters"}``, separated by
    ``;`` or whitespace), whatever the template's ``style`` (:func:`tool_call_style`, checked).

    ``tool_names``: the bound tools; JSON naming another tool is not a call. ``None`` accepts any
    name. What is not a call is the content (stripped); a block that does not parse stays in it."""
    if style not in ("hermes", "llama3", "json"):
        raise InvalidInputError(f"unknown tool-call style {style!r}; one of hermes, llama3, json")
    names = frozenset(tool_names) if tool_names is not None else None
    events, _, _ = scan(text, names, final=True)
    calls = [e for e in events if isinstance(e, ToolCall)]
    return ParsedToolCalls(calls, "".join(e for e in events if isinstance(e, str)).strip())
