"""What the framework integrations share, once, with no framework import.

``langchain-kvboost`` (``ChatKVBoost``, ``KVBoostLLM``) and ``llama-index-llms-kvboost``
(``KVBoostLLM``) are thin: they turn framework objects into engine calls. The rules they have in
common live here so that both behave alike:

* **Engine ownership**: :class:`EngineHolder` (:class:`LazyEngineMixin` plus an async load) - an
  object holding ``engine`` / ``model_id`` / ``engine_kwargs`` loads the engine on first use
  (shared per model and options, :meth:`KVBoostEngine.shared`), off the event loop in async code.
* **Generation options**: :func:`generation_kwargs` merges an object's settings, its
  pass-through options (``model_kwargs`` / ``generate_kwargs``) and per-call keyword arguments
  into ``engine.stream`` arguments. Unknown names are an error, never dropped silently; Hugging
  Face ``generate()`` names the engine does not implement (``num_beams``...) are refused with a
  clear message. The accepted names are the engine's
  :data:`~kvboost_rag.serve.request.GENERATION_OPTIONS` (the fields of ``SamplingParams`` plus
  ``strategy``, ``recompute_ratio``, ``timeout``), so an option the core gains later passes
  through with no change here; :func:`option_fields` maps an integration's own fields onto them.
* **Stop, constraint and budget**: :func:`constrained_kwargs` is the one place a framework's
  ``stop`` yields to a constraint the integration derived (``response_format``, a forced tool
  call; the engine itself refuses both given together), and where a structured answer gets the
  budget its schema needs (:func:`structured_budget`).
* **Documents a framework retrieved**: :func:`mark_documents` turns the retrieved texts a flat
  prompt holds into document segments (:class:`MarkedPrompt`), so they are stored on first use
  and reused after, however short.
* **Message translation**: :func:`engine_role`, :func:`engine_message`,
  :func:`refuse_media` - framework roles to chat-template roles, text parts and document
  segments to one engine chat message, media refused (the engine serves text-only models).
* **Telemetry**: :func:`telemetry` (the measurements of one answer, for response metadata) and
  :func:`usage` (token counts, reused KV reported as cache reads).
"""
from __future__ import annotations

import asyncio
import re
from typing import Any, Iterable, Mapping, Sequence

from kvboost_rag.errors import InvalidInputError
from kvboost_rag.serve.request import GENERATION_OPTIONS

# ---------------------------------------------------------------------------------------------
# Engine ownership
# ---------------------------------------------------------------------------------------------
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class LazyEngineMixin:
    """For framework wrappers (LangChain, LlamaIndex) that hold ``engine``, ``model_id`` and
    ``engine_kwargs``: the engine loads on first use and is shared per (model, options)."""

    def load_engine(self):
        """The engine, loading it now if this object was configured lazily."""
        if self.engine is None:
            from kvboost_rag.engine import KVBoostEngine  # torch and transformers: only when a model loads

            self.engine = KVBoostEngine.shared(self.model_id, **self.engine_kwargs)
        return self.engine

    @property
    def model_label(self) -> str:
        """Model name for tracing and metadata, without forcing a lazy engine to load."""
        name = self.model_id if self.engine is None else getattr(self.engine, "model_name", None)
        return str(name or DEFAULT_MODEL_NAME)


class EngineHolder(LazyEngineMixin):
    """:class:`LazyEngineMixin` plus the async load both integrations need."""

    async def aload_engine(self):
        """:meth:`load_engine`, with a lazy load (seconds) run in a worker thread, not on the loop."""
        if self.engine is None:
            await asyncio.get_running_loop().run_in_executor(None, self.load_engine)
        return self.engine


# ---------------------------------------------------------------------------------------------
# Generation options
# ---------------------------------------------------------------------------------------------
#: Options of Hugging Face ``generate()`` that users set on other integrations
#: (``HuggingFacePipeline``, ``HuggingFaceLLM``). Passed through when the engine implements them;
#: until then they are refused with a message saying so, instead of an "unknown option" error.
HF_GENERATION_OPTIONS = frozenset({
    "repetition_penalty", "frequency_penalty", "presence_penalty", "no_repeat_ngram_size", "min_p",
    "typical_p", "min_new_tokens", "length_penalty", "num_beams", "do_sample", "bad_words_ids",
    "encoder_repetition_penalty", "epsilon_cutoff", "eta_cutoff",
})

#: Framework spellings of engine option names.
OPTION_ALIASES = {"max_tokens": "max_new_tokens", "stop_sequences": "stop"}

# Options whose ``None`` means "the engine's default": left out of the engine call.
_NONE_IS_DEFAULT = ("max_new_tokens", "strategy", "recompute_ratio", "timeout")


def engine_generation_options() -> frozenset:
    """Names ``engine.generate`` / ``engine.stream`` accept for one generation: the fields of
    :class:`~kvboost_rag.decode.loop.SamplingParams` and the request's own options."""
    return GENERATION_OPTIONS


def option_fields(field_names: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """``(field, engine option)`` for each of an integration object's fields that is a generation
    option, under its own name or a framework spelling (``max_tokens`` -> ``max_new_tokens``)."""
    supported = engine_generation_options()
    return tuple((name, OPTION_ALIASES.get(name, name)) for name in field_names
                 if OPTION_ALIASES.get(name, name) in supported)


def normalize_aliases(options: Mapping[str, Any], *, owner: str) -> dict:
    """``max_tokens`` -> ``max_new_tokens`` (and other :data:`OPTION_ALIASES`); both spellings
    with different values is an error."""
    out: dict = {}
    for name, value in options.items():
        target = OPTION_ALIASES.get(name, name)
        if target in out and out[target] != value:
            raise InvalidInputError(f"{owner}: {name}={value!r} conflicts with {target}={out[target]!r}; give one")
        out[target] = value
    return out


def check_generation_options(options: Mapping[str, Any], *, owner: str, where: str = "",
                             reserved: Iterable[str] = (), error: type = InvalidInputError) -> dict:
    """Validate pass-through options (constructor ``model_kwargs`` / ``generate_kwargs``, call
    keyword arguments); returns them with aliases normalized.

    ``reserved``: names that are fields of the calling object (``temperature``...): given in a
    pass-through dict they would be ambiguous, so they are refused there.
    """
    options = normalize_aliases(options, owner=owner)
    where = f" {where}" if where else ""
    clash = sorted(set(options) & set(reserved))
    if clash:
        raise error(f"{owner}{where}: {clash} are parameters of {owner}; set them directly, not here")
    supported = engine_generation_options()
    unsupported = sorted(n for n in options if n not in supported and n in HF_GENERATION_OPTIONS)
    if unsupported:
        raise error(
            f"{owner}{where}: {unsupported} not supported by this kvboost-rag engine (its decode loop has no "
            f"such option yet); supported generation options: {sorted(supported)}")
    unknown = sorted(n for n in options if n not in supported)
    if unknown:
        raise error(f"{owner}{where}: unknown argument(s) {unknown}; supported generation options: "
                    f"{sorted(supported)}")
    return options


def generation_kwargs(settings: Mapping[str, Any], *, passthrough: Mapping[str, Any] = (),
                      call: Mapping[str, Any] = (), owner: str) -> dict:
    """``engine.stream`` keyword arguments for one call.

    ``settings``: the object's own parameters, in engine names; ``passthrough``: its
    ``model_kwargs`` / ``generate_kwargs``; ``call``: per-call keyword arguments (framework
    names allowed, see :data:`OPTION_ALIASES`). Later sources win. Unknown names raise
    :class:`~kvboost_rag.errors.InvalidInputError`; ``None`` for ``max_new_tokens``,
    ``strategy``, ``recompute_ratio``, ``timeout`` keeps the engine default.
    """
    merged = dict(settings)
    merged.update(check_generation_options(dict(passthrough), owner=owner, where="model options"))
    merged.update(check_generation_options(dict(call), owner=owner, where="call"))
    for name in _NONE_IS_DEFAULT:
        if merged.get(name, 0) is None:
            del merged[name]
    if "temperature" in merged:
        merged["temperature"] = float(merged["temperature"] or 0.0)
    if merged.get("max_new_tokens") is not None:
        merged["max_new_tokens"] = int(merged["max_new_tokens"])
    stop = merged.get("stop")
    if stop is not None:
        merged["stop"] = [stop] if isinstance(stop, str) else (list(stop) or None)
    return merged


# ---------------------------------------------------------------------------------------------
# Structured output
# ---------------------------------------------------------------------------------------------
def response_format_constraint(response_format: Any, *, owner: str):
    """The :class:`~kvboost_rag.decode.constraints.Constraint` of an OpenAI-style ``response_format``, or
    ``None`` for plain text.

    Accepted: ``None`` / ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}`` (any
    object), ``{"type": "json_schema", "json_schema": {"schema": {...}, ...}}`` (OpenAI's form),
    a JSON schema dict, or a pydantic class. Anything else raises
    :class:`~kvboost_rag.errors.InvalidInputError`: a format is never silently ignored."""
    from kvboost_rag.decode.constraints import json_object_constraint, json_schema_constraint

    if response_format is None:
        return None
    if isinstance(response_format, type) or isinstance(response_format, str):
        return json_schema_constraint(response_format)
    if not isinstance(response_format, Mapping):
        raise InvalidInputError(f"{owner}: response_format must be a dict or a pydantic class, "
                                f"got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text" and len(response_format) == 1:
        return None
    if kind == "json_object" and len(response_format) == 1:
        return json_object_constraint()
    if kind == "json_schema" and isinstance(response_format.get("json_schema"), Mapping):
        spec = response_format["json_schema"]
        schema = spec.get("schema")
        if not isinstance(schema, Mapping):
            raise InvalidInputError(f"{owner}: response_format json_schema needs a 'schema' dict")
        return json_schema_constraint(dict(schema))
    if "properties" in response_format or "$defs" in response_format or "anyOf" in response_format \
            or kind in ("object", "array", "string", "integer", "number", "boolean"):
        return json_schema_constraint(dict(response_format))
    raise InvalidInputError(
        f"{owner}: unsupported response_format {response_format!r:.120}; use {{'type': 'json_object'}}, "
        "{'type': 'json_schema', 'json_schema': {'schema': {...}}}, a JSON schema or a pydantic class")


#: Tokens a structured answer may take when its schema sets no bound (a string without
#: ``maxLength``, an array without ``maxItems``), unless the caller's limit is larger: room for
#: any sensible object, while a model looping inside a string stops there.
UNBOUNDED_STRUCTURED_TOKENS = 256


def _regex_max_width(regex: str):
    """The most characters a text matching ``regex`` can have, or None if unbounded."""
    try:
        import re._parser as sre_parse  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse
    try:
        width = sre_parse.parse(regex).getwidth()[1]
    except Exception:  # a pattern Python's parser does not read: treat as unbounded
        return None
    return None if width >= sre_parse.MAXREPEAT else int(width)


def structured_budget(constraint: Any, requested: Any, prompt_tokens: int, context_window: int) -> Any:
    """``max_new_tokens`` of a constrained answer (structured output, a forced tool call): the
    larger of the caller's limit (``requested``; None: the engine default, 128) and what the
    schema needs, within the room the context window leaves after the prompt.

    What the schema needs: the longest text its grammar allows, in characters (a token holds at
    least one character of ASCII text), when the schema bounds every part; otherwise
    :data:`UNBOUNDED_STRUCTURED_TOKENS`. So a small ``max_tokens`` never cuts an object in half
    (which would be a :class:`~kvboost_rag.errors.StructuredOutputError`). A caller's limit larger
    than the room is left as is (the engine says the prompt does not fit)."""
    requested = int(requested) if requested is not None else 128
    width = _regex_max_width(constraint.regex)
    need = width if width is not None else UNBOUNDED_STRUCTURED_TOKENS
    room = int(context_window) - int(prompt_tokens)
    if requested >= need or requested >= room:
        return requested
    return max(requested, min(need, room))


def constrained_kwargs(kwargs: Mapping[str, Any], constraint: Any, *, engine: Any = None, prompt: Any = None) -> dict:
    """Generation keyword arguments with ``constraint`` set (``None``: ``kwargs`` unchanged).

    The one rule for ``stop`` under a constraint the integration derived itself (a
    ``response_format``, a forced tool call): the stop sequences are dropped, since the grammar
    ends the answer and the engine (:class:`~kvboost_rag.decode.loop.SamplingParams`) refuses both
    given together. With ``engine`` and ``prompt``, ``max_new_tokens`` becomes the
    :func:`structured_budget` (a structured answer never fails on a limit its object cannot fit
    in). Both integrations and :func:`~kvboost_rag.frameworks.tool_calls.generate_tool_calls`
    go through here."""
    out = dict(kwargs)
    if constraint is not None:
        out.pop("stop", None)
        out["constraint"] = constraint
        if engine is not None and prompt is not None:
            out["max_new_tokens"] = structured_budget(constraint, out.get("max_new_tokens"),
                                                      engine.count_tokens(prompt), engine.context_window)
    return out


# ---------------------------------------------------------------------------------------------
# Message translation
# ---------------------------------------------------------------------------------------------
#: Framework role names -> chat-template roles (LangChain message types, LlamaIndex roles).
ROLE_ALIASES = {
    "human": "user", "ai": "assistant", "chatbot": "assistant", "model": "assistant",
    "developer": "system", "function": "tool",
}


def engine_role(role: Any) -> str:
    """A framework role (``"human"``, ``MessageRole.CHATBOT``...) as a chat-template role."""
    role = str(getattr(role, "value", role))
    return ROLE_ALIASES.get(role, role)


def engine_message(role: Any, parts: Sequence[Any]) -> dict:
    """One engine chat message from ordered parts (``str`` and ``Segment.document``): plain text
    when there is no document, else the parts as segments (the engine joins them)."""
    parts = list(parts)
    if all(isinstance(p, str) for p in parts):
        return {"role": engine_role(role), "content": "".join(parts)}
    return {"role": engine_role(role), "content": parts}


def document_part(text: str):
    """A document's text as an engine document segment (its stored KV is reused)."""
    from kvboost_rag.prompt.segments import Segment

    return Segment.document(text)


class MarkedPrompt(list):
    """A prompt (a list of :class:`~kvboost_rag.prompt.segments.Segment`) whose documents its caller
    marked itself: the retrieved documents a framework passed (:func:`mark_documents`), or a tool
    turn (whose template adds tool instructions, which are no documents). Write-behind stores its
    document segments after first use, and looks for no other documents in its text
    (``recognise_documents = False``; see :mod:`kvboost_rag.index.write_behind`)."""

    recognise_documents = False


def mark_documents(segments: Any, documents: Iterable[str], engine: Any = None) -> MarkedPrompt:
    """``segments`` with every verbatim occurrence of one of ``documents`` (the texts a framework
    retrieved: LangChain ``page_content``, LlamaIndex node contents) in a text segment made a
    document segment, the longest first; the prompt's text is unchanged. Their stored KV is
    reused, and a document not stored yet is stored after this answer (write-behind), so the next
    prompt holding it reuses it, however short it is.

    ``engine``: the engine's automatic detection runs first (``engine.segments``), so a stored
    text that holds a retrieved one (a document warmed as the chain renders it, ``"Source: ...\\n"``
    and its content) stays one document."""
    from kvboost_rag.prompt.segments import Segment

    texts = sorted({d.strip() for d in documents if isinstance(d, str) and d.strip()}, key=len, reverse=True)
    if not texts:
        return MarkedPrompt([Segment("text", segments)] if isinstance(segments, str) else segments)
    if engine is not None:
        segments = engine.segments(segments)
    elif isinstance(segments, str):
        segments = [Segment("text", segments)]
    pattern = re.compile("|".join(re.escape(t) for t in texts))
    out = MarkedPrompt()
    for seg in segments:
        if seg.is_document:
            out.append(seg)
            continue
        last = 0
        for m in pattern.finditer(seg.text):
            if m.start() > last:
                out.append(Segment("text", seg.text[last:m.start()]))
            out.append(Segment("document", m.group(0)))
            last = m.end()
        if last < len(seg.text):
            out.append(Segment("text", seg.text[last:]))
    return out


def refuse_media(owner: str, kind: str) -> None:
    """The engine serves text-only models: refuse image/audio/video/file inputs clearly."""
    raise InvalidInputError(f"{owner} serves text-only models; got a {kind!r} content block")


# ---------------------------------------------------------------------------------------------
# Telemetry
# ---------------------------------------------------------------------------------------------
def telemetry(result: Any, model_name: str) -> dict:
    """The measurements of one answer (no text) for response metadata: TTFT, reused / recomputed /
    fresh tokens, documents in the prompt and documents whose KV came from the store."""
    out = {"model_name": model_name, **result.telemetry()}
    extra = getattr(result, "extra", None) or {}
    for name in ("documents", "documents_reused"):
        if name in extra:
            out[name] = extra[name]
    return out


def usage(result: Any) -> dict:
    """Token counts of one answer; reused KV tokens are the prompt's cache reads."""
    prompt, completion = int(result.prompt_tokens), int(result.completion_tokens)
    return {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
            "cache_read_tokens": int(result.reused_tokens)}


__all__ = [
    "EngineHolder", "LazyEngineMixin", "DEFAULT_MODEL_NAME", "HF_GENERATION_OPTIONS", "OPTION_ALIASES", "ROLE_ALIASES",
    "engine_generation_options", "option_fields", "normalize_aliases", "check_generation_options", "generation_kwargs",
    "engine_role", "engine_message", "response_format_constraint", "MarkedPrompt", "mark_documents",
    "structured_budget", "UNBOUNDED_STRUCTURED_TOKENS", "constrained_kwargs", "document_part", "refuse_media", "telemetry", "usage",
]
