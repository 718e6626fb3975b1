"""Chat messages -> prompt segments, with documents kept as document segments.

Chains hand the engine chat messages; the engine needs segments (text / document) so that each
document's tokens are exactly the ones it was encoded with. Documents are swapped for sentinels,
the tokenizer's chat template renders the messages, and the result is split back at the
sentinels. The same trick gives the encoding preamble: the template's text in front of the first
user message, so documents are encoded as they will sit in a prompt.
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Optional, Sequence

from kvboost_rag import validate
from kvboost_rag.errors import EmptyInputError, InvalidInputError
from kvboost_rag.prompt.segments import Segment
from kvboost_rag.prompt.tools import check_tool_support, message_extras, normalize_tools

_DOC_SENTINEL = "\ue000KVBOOST_DOC_{}\ue001"


def template_preamble(tokenizer, system_prompt: str) -> str:
    """The chat template's prefix up to the first user message's content (with ``system_prompt``
    as the system turn); without a template, the system prompt and a blank line."""
    if getattr(tokenizer, "chat_template", None):
        sentinel = _DOC_SENTINEL.format(0)
        rendered = tokenizer.apply_chat_template(
            [{"role": "system", "content": system_prompt}, {"role": "user", "content": sentinel}],
            tokenize=False, add_generation_prompt=False)
        if sentinel in rendered:
            return rendered[: rendered.index(sentinel)]
    return system_prompt + "\n\n"


def render_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True,
                tools: Optional[Sequence] = None, model_name: Optional[str] = None) -> list[Segment]:
    """Render chat messages with the tokenizer's chat template, keeping documents as segments.

    A message is ``{"role": ..., "content": ...}`` with a role in
    :data:`kvboost_rag.validate.CHAT_ROLES`; its content is a string, a list of strings /
    :class:`Segment` objects (parts are joined by a blank line), or for an assistant message None /
    absent (empty). Anything
    else is an :class:`~kvboost_rag.errors.InvalidInputError` naming the message. Documents are replaced by sentinels, the template is
    rendered, and the result is split back into text and document segments.

    Tool use (:mod:`kvboost_rag.prompt.tools`): ``tools`` (JSON schemas / functions) are passed to the
    template (:class:`~kvboost_rag.errors.ToolsNotSupportedError`, naming ``model_name``, if it has no
    tool support); an
    assistant message's ``tool_calls`` and a ``tool`` message's ``tool_call_id`` / ``name`` pass
    through as Hugging Face templates expect; a tool result given as a dict is sent as its JSON."""
    extras: list[dict] = []
    if isinstance(messages, Iterable) and not isinstance(messages, (str, bytes, bytearray, Mapping)):
        messages = [_tool_result_as_text(m) for m in messages]
        extras = [message_extras(m) if isinstance(m, Mapping) else {} for m in messages]
    messages = check_messages(messages)  # refuses a str, a dict... with a clear message
    template_kwargs = {}
    if tools:
        check_tool_support(tokenizer, model_name)
        template_kwargs["tools"] = normalize_tools(tools)
    docs: list[str] = []
    rendered_msgs = []
    for m, extra in zip(messages, extras):
        content = m["content"]
        if isinstance(content, str):
            rendered_msgs.append({"role": m["role"], "content": content, **extra})
            continue
        parts = []
        for part in content:
            if isinstance(part, Segment) and part.is_document:
                if not part.text.strip():
                    raise EmptyInputError("A document segment is empty; drop it or give it text.")
                parts.append(_DOC_SENTINEL.format(len(docs)))
                docs.append(part.text)
            else:
                parts.append(part.text if isinstance(part, Segment) else str(part))
        rendered_msgs.append({"role": m["role"], "content": "\n\n".join(p for p in parts if p), **extra})
    if getattr(tokenizer, "chat_template", None):
        flat = tokenizer.apply_chat_template(rendered_msgs, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **template_kwargs)
    else:
        flat = "".join(f"{m['role']}: {m['content']}\n" for m in rendered_msgs)
        if add_generation_prompt:
            flat += "assistant: "
    segments: list[Segment] = []
    rest = flat
    for i, text in enumerate(docs):
        sentinel = _DOC_SENTINEL.format(i)
        before, _, rest = rest.partition(sentinel)
        if before:
            segments.append(Segment("text", before))
        segments.append(Segment("document", text))
    if rest:
        segments.append(Segment("text", rest))
    return segments


def _tool_result_as_text(message):
    """A ``tool`` message whose content is a dict (a tool's structured result) -> its JSON text."""
    if isinstance(message, Mapping) and message.get("role") == "tool" and isinstance(message.get("content"), Mapping):
        return {**message, "content": json.dumps(message["content"], ensure_ascii=False)}
    return message


def render_tools(tokenizer, messages: Sequence[dict], tools: Sequence[Any], add_generation_prompt: bool = True):
    """Segments of a chat with ``tools`` rendered by the template (documents stay segments).
    :class:`ToolsNotSupportedError` when the template has no tool support."""
    return render_chat(tokenizer, messages, add_generation_prompt, tools=tools)


def check_messages(messages: Any) -> list[dict]:
    """Check chat messages and return them as ``[{"role": str, "content": str | list}]``.

    Each message is a dict with a ``role`` in :data:`~kvboost_rag.validate.CHAT_ROLES` and a ``content`` that is a str
    or a list of str / Segment; an assistant message's content may be None / absent (taken as "": OpenAI
    style, a message that carries ``tool_calls``), any other message's may not."""
    if isinstance(messages, (str, bytes, bytearray, Mapping)) or not isinstance(messages, Iterable):
        raise InvalidInputError(
            f"chat messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidInputError(f"chat message {i} must be a dict with 'role' and 'content', "
                                    f"got {type(m).__name__}")
        role = m.get("role")
        if role is None:
            raise InvalidInputError(f"chat message {i} has no 'role'; give one of {', '.join(validate.CHAT_ROLES)}")
        if role not in validate.CHAT_ROLES:
            raise InvalidInputError(f"chat message {i} has role {validate.show(role)}; accepted roles: {', '.join(validate.CHAT_ROLES)}")
        content = m.get("content")
        if content is None and role != "assistant":
            raise InvalidInputError(
                f"chat message {i} ({role}) has {'content None' if 'content' in m else 'no content'}; give its "
                "text ('' for an empty message). Only an assistant message may omit it (OpenAI style, e.g. one "
                "that carries tool_calls)")
        if content is None or isinstance(content, str):
            out.append({"role": role, "content": validate.text(f"chat message {i}'s content", content or "")})
            continue
        if isinstance(content, (bytes, bytearray, Mapping)) or not isinstance(content, Iterable):
            raise InvalidInputError(f"chat message {i}'s content must be a str or a list of str / Segment, "
                                    f"got {type(content).__name__}")
        parts = list(content)
        for part in parts:
            if not isinstance(part, (str, Segment)):
                raise InvalidInputError(f"chat message {i}'s content holds a {type(part).__name__} "
                                        f"{validate.show(part)}; parts must be str or Segment")
            if isinstance(part, str):
                validate.text(f"chat message {i}'s content", part)
        out.append({"role": role, "content": parts})
    return out
