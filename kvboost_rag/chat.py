"""Chat messages -> prompt segments, with documents kept as document segments.

Chains hand the engine chat messages; the engine needs segments (text / document) so that each
document's tokens are exactly the ones it was encoded with. Documents are swapped for sentinels,
the tokenizer's chat template renders the messages, and the result is split back at the
sentinels. The same trick gives the encoding preamble: the template's text in front of the first
user message, so documents are encoded as they will sit in a prompt.
"""
from __future__ import annotations

import json
from typing import Iterable, Mapping, Optional, Sequence

from . import validate
from .errors import EmptyInputError
from .segments import Segment

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
                tools: Optional[Sequence] = None) -> list[Segment]:
    """Render chat messages with the tokenizer's chat template, keeping documents as segments.

    A message is ``{"role": ..., "content": ...}`` with a role in
    :data:`kvboost_rag.validate.CHAT_ROLES`; its content is a string, a list of strings /
    :class:`Segment` objects (parts are joined by a blank line), or None / absent (empty). Anything
    else is an :class:`~kvboost_rag.errors.InvalidInputError` naming the message. Documents are replaced by sentinels, the template is
    rendered, and the result is split back into text and document segments.

    Tool use (:mod:`kvboost_rag.tools`): ``tools`` (JSON schemas / functions) are passed to the
    template (:class:`~kvboost_rag.errors.ToolsNotSupportedError` if it has no tool support); an
    assistant message's ``tool_calls`` and a ``tool`` message's ``tool_call_id`` / ``name`` pass
    through as Hugging Face templates expect; a tool result given as a dict is sent as its JSON."""
    from .tools import check_tool_support, message_extras, normalize_tools

    extras: list[dict] = []
    if isinstance(messages, Iterable) and not isinstance(messages, (str, bytes, bytearray, Mapping)):
        messages = [_tool_result_as_text(m) for m in messages]
        extras = [message_extras(m) if isinstance(m, Mapping) else {} for m in messages]
    messages = validate.chat_messages(messages)  # refuses a str, a dict... with a clear message
    template_kwargs = {}
    if tools:
        check_tool_support(tokenizer)
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
