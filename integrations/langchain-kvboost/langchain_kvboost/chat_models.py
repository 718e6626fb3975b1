"""``ChatKVBoost``: a LangChain chat model backed by a local :class:`kvboost_rag.KVBoostEngine`.

Messages are rendered with the tokenizer's chat template (``engine.chat_segments``); content
blocks marked as documents (see :mod:`langchain_kvboost.documents`) stay separate document
segments, so their stored KV is reused. Documents pasted into plain text are found by the
engine's automatic detection when they were warmed. Telemetry: ``usage_metadata`` reports reused
KV tokens as ``input_token_details.cache_read``; ``response_metadata`` carries ``ttft_s`` and the
reused/recomputed/fresh token counts.
"""
from __future__ import annotations

import json
from operator import itemgetter
from typing import Any, AsyncIterator, Callable, Iterator, Literal, Optional, Sequence, Union

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage, ToolMessage
from langchain_core.output_parsers import JsonOutputKeyToolsParser, JsonOutputParser, PydanticOutputParser, \
    PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

from kvboost_rag.frameworks import options as integration
from kvboost_rag.serve.streaming import TokenStream
from kvboost_rag.frameworks.tool_calls import ToolCallStream, ToolTurn, prepare_tool_turn

from kvboost_rag import validate
from kvboost_rag.errors import InvalidConfigError, InvalidInputError

from ._base import CheckedBatch, KVBoostParams, response_metadata, usage_metadata
from .documents import is_document_block
from .retrieved import retrieved_documents

_MEDIA_BLOCKS = {"image", "image_url", "audio", "input_audio", "video", "file"}


def _text_parts(content: Any) -> list:
    if isinstance(content, str):
        return [content]
    parts: list = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif is_document_block(block):
            parts.append(integration.document_part(block["text"]))
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif isinstance(block, dict) and block.get("type") in _MEDIA_BLOCKS:
            integration.refuse_media("ChatKVBoost", block["type"])
    return parts


def message_to_engine(message: BaseMessage) -> dict:
    """One LangChain message as an engine chat message (``{"role", "content"}``, plus the tool
    keys chat templates read).

    Text blocks become text; document-marked blocks become ``Segment.document``; non-text output
    blocks of earlier AI turns (reasoning, tool-use blocks) are dropped; media inputs are refused,
    since the engine serves text-only models. An ``AIMessage``'s ``tool_calls`` are kept
    (``{"id", "type": "function", "function": {"name", "arguments"}}``); a ``ToolMessage`` becomes a
    ``"tool"`` turn with its ``tool_call_id`` and ``name``. Role and joining rules:
    :mod:`kvboost_rag.frameworks.options`.
    """
    role = message.role if isinstance(message, ChatMessage) else message.type
    out = integration.engine_message(role, _text_parts(message.content))
    if isinstance(message, AIMessage) and message.tool_calls:
        out["tool_calls"] = [{"id": c.get("id") or "", "type": "function",
                              "function": {"name": c["name"], "arguments": c.get("args") or {}}}
                             for c in message.tool_calls]
    elif isinstance(message, ToolMessage):
        out["tool_call_id"] = message.tool_call_id
        if message.name:
            out["name"] = message.name
    return out


def _json_schema_or_none(schema: Any) -> Optional[dict]:
    """``schema`` as a JSON schema, or None when it is none (``json_mode`` without a usable schema)."""
    if schema is None:
        return None
    try:
        return convert_to_json_schema(schema)
    except Exception:
        return None


def _lc_tool_calls(calls: Sequence[Any]) -> list[dict]:
    return [{"name": c.name, "args": c.arguments, "id": c.id, "type": "tool_call"} for c in calls]


def _lc_tool_call_chunk(call: Any, index: int) -> dict:
    """One whole call as a LangChain ``ToolCallChunk`` (arguments as JSON text; ``index`` keeps the
    calls of one answer apart when chunks are merged)."""
    return {"name": call.name, "args": json.dumps(call.arguments, ensure_ascii=False), "id": call.id,
            "index": index, "type": "tool_call_chunk"}


def _openai_tools(tools: Any) -> list[dict]:
    """``bind_tools``' tools as OpenAI tool dicts; anything that is not a list of tools is an
    :class:`~kvboost_rag.errors.InvalidInputError` naming the culprit."""
    usage = ("a tool is a dict (OpenAI function or JSON schema), a pydantic class, a function or a BaseTool; "
             "pass a list of them: bind_tools([get_weather])")
    if isinstance(tools, (str, bytes, bytearray, dict)) or not isinstance(tools, Sequence):
        raise InvalidInputError(f"bind_tools takes a list of tools, got a {type(tools).__name__} "
                                f"{validate.show(tools)}; {usage}")
    out = []
    for i, tool in enumerate(tools):
        try:
            out.append(convert_to_openai_tool(tool))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise InvalidInputError(f"bind_tools: tool {i} is a {type(tool).__name__} {validate.show(tool)}, "
                                    f"not a tool ({str(exc).splitlines()[0][:80]}); {usage}") from exc
    return out


class ChatKVBoost(CheckedBatch, BaseChatModel, KVBoostParams):
    """Chat model answering from a local HF model with pre-encoded document KV reused.

    Build lazily from a model (``ChatKVBoost.from_model_id("HuggingFaceTB/SmolLM2-360M-Instruct")``,
    ``None`` for the engine default) or around a loaded engine (``ChatKVBoost(engine=engine)``) so
    several LangChain objects share one model and KV store. Supports invoke/batch/stream and their
    async forms (the engine runs in a worker thread; ``astream`` yields tokens as they are
    decoded), ``on_llm_new_token`` callbacks, stop sequences, ``temperature``, ``max_tokens``,
    ``timeout``.
    """

    @property
    def _llm_type(self) -> str:
        return "kvboost-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_label,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "strategy": self.strategy,
            "recompute_ratio": self.recompute_ratio,
        }

    def _get_ls_params(self, stop: Optional[list[str]] = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "kvboost"
        model = kwargs.get("model")
        params["ls_model_name"] = model if isinstance(model, str) else self.model_label
        ls_stop = stop if stop is not None else self.stop
        if ls_stop:
            params["ls_stop"] = list(ls_stop)
        return params

    # -- translation -------------------------------------------------------------------------
    def _prepare(self, messages: Sequence[BaseMessage], stop: Optional[list[str]],
                 kwargs: dict, run_manager: Any = None) -> tuple[TokenStream, Optional[ToolTurn]]:
        """The engine stream of one call and, when tools are bound, how to read calls back.

        Documents the chain retrieved (or was given) and pasted into the prompt's text are
        handed over as document segments (:mod:`langchain_kvboost.retrieved`).

        ``tools`` / ``tool_choice`` (from :meth:`bind_tools`): rendered by the chat template; a
        forcing ``tool_choice`` decodes the call under a JSON-schema constraint.
        ``response_format`` (``{"type": "json_object"}``, ``{"type": "json_schema", ...}``, a
        JSON schema or a pydantic class): the answer is constrained to it."""
        kwargs = dict(kwargs)
        kwargs.pop("ls_structured_output_format", None)
        tools = kwargs.pop("tools", None)
        tool_choice = kwargs.pop("tool_choice", None)
        kwargs.pop("parallel_tool_calls", None)
        response_format = kwargs.pop("response_format", None)
        engine = self.load_engine()
        gen_kwargs = self._generation_kwargs(stop, kwargs)
        constraint = integration.response_format_constraint(response_format, owner="ChatKVBoost")
        engine_messages = [message_to_engine(m) for m in messages]
        if tools:
            if constraint is not None:
                raise ValueError("ChatKVBoost: give tools or response_format, not both (with_structured_output "
                                 "uses one of them)")
            turn = prepare_tool_turn(engine, engine_messages, tools, tool_choice)
            turn.segments = integration.mark_documents(turn.segments, retrieved_documents(run_manager), engine)
            return engine.stream(turn.segments, **integration.constrained_kwargs(gen_kwargs, turn.constraint, engine=engine,
                                                                           prompt=turn.segments)), turn
        if tool_choice not in (None, "auto", "none"):
            raise InvalidConfigError(f"ChatKVBoost: tool_choice={tool_choice!r} without tools; bind them with "
                                     "bind_tools([...], tool_choice=...)")
        prompt = engine.chat_segments(engine_messages)
        documents = retrieved_documents(run_manager)
        if documents:  # the chain's documents, pasted into the text: document segments
            prompt = integration.mark_documents(prompt, documents, engine)
        # otherwise documents pasted into text are found by the engine (stored ones) and write-behind
        return engine.stream(prompt, **integration.constrained_kwargs(gen_kwargs, constraint, engine=engine,
                                                                      prompt=prompt)), None

    def _chat_result(self, result: Any, turn: Optional[ToolTurn] = None) -> ChatResult:
        content, tool_calls = result.text, []
        if turn is not None:
            parsed = turn.finish(result.text, (result.extra or {}).get("json"))
            content, tool_calls = parsed.content, _lc_tool_calls(parsed.tool_calls)
        finish = "tool_calls" if tool_calls else result.finish_reason
        metadata = response_metadata(result, self.model_label)
        if tool_calls:
            metadata["finish_reason"] = finish
        message = AIMessage(
            content=content,
            tool_calls=tool_calls,
            usage_metadata=usage_metadata(result),
            response_metadata=metadata,
        )
        return ChatResult(generations=[ChatGeneration(message=message, generation_info={"finish_reason": finish})])

    @staticmethod
    def _reader(turn: Optional[ToolTurn]) -> Optional[ToolCallStream]:
        return turn.stream() if turn is not None else None

    @staticmethod
    def _event_chunks(reader: Optional[ToolCallStream], events: Sequence[Any]) -> list[ChatGenerationChunk]:
        """Chunks of streamed events: text as ``content``; each complete tool call as a
        ``tool_call_chunk`` (indexed in the answer's order), so the merged chunks' ``tool_calls``
        are the calls the non-streaming answer has."""
        out = []
        for event in events:
            if isinstance(event, str):
                message = AIMessageChunk(content=event)
            else:
                index = next(i for i, c in enumerate(reader.tool_calls) if c is event)
                message = AIMessageChunk(content="", tool_call_chunks=[_lc_tool_call_chunk(event, index)])
            out.append(ChatGenerationChunk(message=message))
        return out

    def _delta_chunks(self, reader: Optional[ToolCallStream], delta: str) -> list[ChatGenerationChunk]:
        if reader is None:
            return [ChatGenerationChunk(message=AIMessageChunk(content=delta))]
        return self._event_chunks(reader, reader.feed(delta))

    def _closing_chunks(self, reader: Optional[ToolCallStream], result: Any) -> list[ChatGenerationChunk]:
        """What is left once the answer is complete (an unclosed last call, a forced call, a bare
        JSON call), then the closing chunk with usage and metadata."""
        chunks = [] if reader is None else self._event_chunks(reader, reader.close((result.extra or {}).get("json")))
        return chunks + [self._last_chunk(result, tool_calls=bool(reader is not None and reader.tool_calls))]

    def _last_chunk(self, result: Any, tool_calls: bool = False) -> ChatGenerationChunk:
        """Closing chunk: the only one carrying usage and metadata, so merging never duplicates them."""
        metadata = response_metadata(result, self.model_label)
        finish = "tool_calls" if tool_calls else result.finish_reason
        if tool_calls:
            metadata["finish_reason"] = finish
        return ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                usage_metadata=usage_metadata(result),
                response_metadata=metadata,
                chunk_position="last",
            ),
            generation_info={"finish_reason": finish},
        )

    # -- sync ----------------------------------------------------------------------------------
    def _generate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        stream, turn = self._prepare(messages, stop, kwargs, run_manager)
        for delta in stream:
            if run_manager:
                run_manager.on_llm_new_token(delta)
        return self._chat_result(stream.result, turn)

    def _stream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        stream, turn = self._prepare(messages, stop, kwargs, run_manager)
        reader = self._reader(turn)
        for delta in stream:
            for chunk in self._delta_chunks(reader, delta):
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        *rest, last = self._closing_chunks(reader, stream.result)
        for chunk in rest:
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk
        yield last

    # -- async: the engine runs in a worker thread, the event loop only awaits a queue ---------
    async def _aprepare(self, messages, stop, kwargs, run_manager=None) -> tuple[TokenStream, Optional[ToolTurn]]:
        await self.aload_engine()  # a lazy load takes seconds: keep it off the event loop
        return self._prepare(messages, stop, kwargs, run_manager)

    async def _agenerate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                         run_manager: Optional[AsyncCallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))
        stream, turn = await self._aprepare(messages, stop, kwargs, run_manager)
        async for delta in stream:
            if run_manager:
                await run_manager.on_llm_new_token(delta)
        return self._chat_result(stream.result, turn)

    async def _astream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                       run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        stream, turn = await self._aprepare(messages, stop, kwargs, run_manager)
        reader = self._reader(turn)
        async for delta in stream:
            for chunk in self._delta_chunks(reader, delta):
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        *rest, last = self._closing_chunks(reader, stream.result)
        for chunk in rest:
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk
        yield last

    # -- tools and structured output -------------------------------------------------------------
    def bind_tools(self, tools: Sequence[Union[dict[str, Any], type, Callable, BaseTool]], *,
                   tool_choice: Optional[Union[dict, str, bool]] = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (dicts, pydantic classes, functions, ``BaseTool``) to the model.

        The tools are rendered by the model's chat template, and calls are parsed back in its format
        (Hermes ``<tool_call>`` tags for Qwen2.5-style templates, bare JSON for Llama 3.x) into
        ``AIMessage.tool_calls``. ``tool_choice``: ``None`` / ``"auto"`` (the model decides),
        ``"none"``, ``"any"`` / ``"required"`` / ``True`` (one call of some tool), a tool name or
        ``{"type": "function", "function": {"name": ...}}`` (one call of that tool); a forced call
        is decoded under a JSON-schema constraint, so it always parses. A model whose template has
        no tool support raises :class:`kvboost_rag.errors.ToolsNotSupportedError` (naming the model)
        when called. With tools bound, streaming yields text outside calls as it is decoded and
        each call as a ``tool_call_chunk`` as soon as its text is complete (a Hermes
        ``</tool_call>``; a forced call or a bare-JSON call at the end); the merged chunks'
        ``tool_calls`` are the calls :meth:`invoke` would return.
        """
        formatted = _openai_tools(tools)
        if isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "any", "required"):
            names = [t["function"]["name"] for t in formatted]
            if tool_choice not in names:
                raise InvalidConfigError(f"tool_choice {tool_choice!r} names no bound tool; tools: {names}")
        return self.bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(self, schema: Union[dict, type], *,
                               method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
                               include_raw: bool = False, strict: Optional[bool] = None,
                               **kwargs: Any) -> Runnable[LanguageModelInput, Union[dict, Any]]:
        """A runnable whose output is an instance of ``schema`` (pydantic class -> instance;
        TypedDict / JSON schema -> dict). Every method decodes under a constraint, so the output
        always parses; its token budget is the larger of ``max_tokens`` and what the schema needs
        (:func:`kvboost_rag.frameworks.options.structured_budget`), so a small ``max_tokens`` does
        not cut the object.

        ``method``: ``"json_schema"`` (default; the answer is constrained to the schema, works with
        every model), ``"json_mode"`` (the same constraint when ``schema`` is a pydantic class, a
        TypedDict or a JSON schema; any JSON object otherwise), ``"function_calling"``
        (``schema`` is bound as a tool and its call forced; needs a chat template with tool support,
        otherwise :class:`kvboost_rag.errors.ToolsNotSupportedError` is raised when called; there is
        no silent fallback: use ``"json_schema"`` for such models, it gives the same guarantee).
        ``strict`` is accepted for compatibility (decoding is always strict).
        ``include_raw=True``: ``{"raw": AIMessage, "parsed": ..., "parsing_error": None | error}``.
        """
        if kwargs:
            raise ValueError(f"ChatKVBoost.with_structured_output: unknown argument(s) {sorted(kwargs)}")
        if schema is None:
            raise ValueError("with_structured_output needs a schema")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        ls_format = {"schema": schema, "kwargs": {"method": method, "strict": strict}}
        if method == "function_calling":
            tool = convert_to_openai_tool(schema)
            name = tool["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, ls_structured_output_format=ls_format)
            parser: Runnable = (PydanticToolsParser(tools=[schema], first_tool_only=True) if is_pydantic
                                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
        elif method in ("json_schema", "json_mode"):
            # json_mode with a schema: constrained to that schema too (any JSON object only when the
            # schema cannot be read as one), so the parser never meets an object it refuses
            json_schema = _json_schema_or_none(schema) if method == "json_mode" else convert_to_json_schema(schema)
            if json_schema is not None:
                response_format = {"type": "json_schema",
                                   "json_schema": {"name": json_schema.get("title", "output"), "schema": json_schema}}
            else:
                response_format = {"type": "json_object"}
            llm = self.bind(response_format=response_format, ls_structured_output_format=ls_format)
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        else:
            raise ValueError(f"method must be 'json_schema', 'function_calling' or 'json_mode', got {method!r}")
        if not include_raw:
            return llm | parser
        parser_assign = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        parser_none = RunnablePassthrough.assign(parsed=lambda _: None)
        with_fallback = parser_assign.with_fallbacks([parser_none], exception_key="parsing_error")
        return RunnableMap(raw=llm) | with_fallback
