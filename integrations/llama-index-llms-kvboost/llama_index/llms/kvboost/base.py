"""``KVBoostLLM``: a LlamaIndex LLM backed by a local :class:`kvboost_rag.KVBoostEngine`.

Chat messages are rendered with the tokenizer's chat template (``engine.chat_segments``).
A ``CitableBlock`` in a message is handed over as a document segment, so its stored KV is reused
whatever text surrounds it (:class:`KVBoostSynthesizer` builds such messages from retrieved
nodes). Documents inside plain text (the stock compact synthesizer) are found by the engine's
automatic detection when they were warmed. Engine telemetry (TTFT, reused/recomputed/fresh
tokens, documents reused) is in ``additional_kwargs`` of every final response and, for query
engines, in ``Response.metadata["kvboost"]`` (see :mod:`.telemetry`).
"""
from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any, AsyncGenerator, Dict, Generator, List, Optional, Sequence, Type, Union

from llama_index.core.base.llms.types import (
    AudioBlock,
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CitableBlock,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    DocumentBlock,
    ImageBlock,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ToolCallBlock,
    VideoBlock,
)
from llama_index.core.bridge.pydantic import ConfigDict, Field, field_validator, model_validator
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from kvboost_rag.frameworks import options as integration
from kvboost_rag.errors import InvalidConfigError, ToolsNotSupportedError
from kvboost_rag.serve.streaming import TokenStream
from kvboost_rag.frameworks.tool_calls import ToolCallStream, ToolTurn, prepare_tool_turn
from kvboost_rag.prompt.tools import supports_tools, tools_unsupported_message
from llama_index.llms.kvboost.telemetry import current_sinks, deliver, install_response_metadata, retrieved_documents

if TYPE_CHECKING:
    from llama_index.core.prompts import BasePromptTemplate
    from llama_index.core.tools.types import BaseTool

install_response_metadata()  # query engine responses carry the telemetry (Response.metadata["kvboost"])

_MEDIA = (ImageBlock, AudioBlock, VideoBlock, DocumentBlock)
# Fields that are engine generation options (same names as the engine's).
_OPTION_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "strategy", "recompute_ratio",
                  "timeout")
_RESERVED = _OPTION_FIELDS + ("max_tokens",)


def message_to_engine(message: ChatMessage) -> dict:
    """One LlamaIndex message as an engine chat message.

    Blocks are concatenated in order: ``TextBlock`` as text, ``CitableBlock`` as one document
    segment (its text blocks); thinking blocks of earlier turns are dropped; media blocks are
    refused (the engine serves text-only models). Tool use: an assistant turn's calls
    (``ToolCallBlock`` blocks, or OpenAI-style ``additional_kwargs["tool_calls"]``) are kept as the
    message's ``tool_calls``; a ``tool`` turn keeps ``additional_kwargs["tool_call_id"]`` / ``name``.
    Role and joining rules: :mod:`kvboost_rag.frameworks.options`.
    """
    parts: list = []
    calls: list = []
    for block in message.blocks:
        if isinstance(block, TextBlock):
            parts.append(block.text)
        elif isinstance(block, CitableBlock):
            parts.append(integration.document_part("".join(b.text for b in block.content if isinstance(b, TextBlock))))
        elif isinstance(block, ToolCallBlock):
            calls.append({"id": block.tool_call_id or "", "name": block.tool_name, "arguments": block.tool_kwargs})
        elif isinstance(block, _MEDIA):
            integration.refuse_media("KVBoostLLM", type(block).__name__)
    out = integration.engine_message(message.role, parts)
    calls = calls or list(message.additional_kwargs.get("tool_calls") or [])
    if calls:
        out["tool_calls"] = calls
    for key in ("tool_call_id", "name"):
        if isinstance(message.additional_kwargs.get(key), str):
            out[key] = message.additional_kwargs[key]
    return out


def _tool_call_message(content: str, calls: Sequence[Any]) -> ChatMessage:
    """An assistant message with its tool calls as ``ToolCallBlock`` blocks and, for code reading
    the OpenAI form, in ``additional_kwargs["tool_calls"]``."""
    blocks: list = [TextBlock(text=content)] if content else []
    blocks += [ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.arguments) for c in calls]
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks,
                       additional_kwargs={"tool_calls": [c.to_openai() for c in calls]} if calls else {})


class _StreamedChat:
    """The streamed ``ChatResponse`` s of one chat answer, shared by ``stream_chat`` and
    ``astream_chat`` (which only differ in how they iterate the engine's deltas).

    As LlamaIndex function-calling LLMs stream: every response carries the message so far
    (content and the complete tool calls so far, as ``ToolCallBlock`` blocks and in
    ``additional_kwargs["tool_calls"]``) and its ``delta`` (the new content). With tools the
    deltas go through :class:`~kvboost_rag.prompt.tools.ToolCallStream`: text outside call blocks
    streams as decoded, each call comes in the response where its block completes. The closing
    response (``delta=""``, telemetry in ``additional_kwargs``) has the message ``chat`` returns.
    Without tools the message is the plain text so far, the closing one the engine's final text."""

    def __init__(self, turn: Optional[ToolTurn]) -> None:
        self.reader: Optional[ToolCallStream] = turn.stream() if turn is not None else None
        self.content = ""

    def _message(self) -> ChatMessage:
        if self.reader is None:
            return ChatMessage(role=MessageRole.ASSISTANT, content=self.content)
        return _tool_call_message(self.content, self.reader.tool_calls)

    def _responses(self, events: Sequence[Any]) -> list[ChatResponse]:
        """One response per event: a text event is its ``delta``; a tool call has ``delta=""``."""
        out = []
        for event in events:
            delta = event if isinstance(event, str) else ""
            self.content += delta
            out.append(ChatResponse(message=self._message(), delta=delta))
        return out

    def feed(self, delta: str) -> list[ChatResponse]:
        """The responses made known by the engine's next text ``delta`` (maybe none)."""
        return self._responses([delta] if self.reader is None else self.reader.feed(delta))

    def close(self, result: Any, extra: dict) -> list[ChatResponse]:
        """What is left once the answer is complete (an unclosed last call, a forced call, a bare
        JSON call), then the closing response with the telemetry ``extra``."""
        out = [] if self.reader is None else self._responses(self.reader.close((result.extra or {}).get("json")))
        if self.reader is None:
            self.content = result.text  # the engine's final text (stop sequences trimmed)
        return out + [ChatResponse(message=self._message(), delta="", additional_kwargs=extra)]


def telemetry(result: Any, model_name: str) -> dict:
    """Engine measurements of one generation, for ``additional_kwargs``."""
    return integration.telemetry(result, model_name)


class KVBoostLLM(integration.EngineHolder, FunctionCallingLLM):
    """LlamaIndex LLM over a local model with pre-encoded document KV reused.

    Build lazily from a model (``KVBoostLLM(model_id=None)`` is the engine default, SmolLM2) or
    around a loaded engine (``KVBoostLLM(engine=engine)``) to share one model and KV store with
    other components (``KVBoostWarmer``, LangChain's ``ChatKVBoost``). ``max_tokens`` is accepted
    for ``max_new_tokens``; ``generate_kwargs`` passes further engine options through; unknown
    constructor or call arguments are an error. Telemetry (TTFT, reused / recomputed / fresh
    tokens, documents reused) is in ``additional_kwargs`` of every final response and, for query
    engines, in ``Response.metadata["kvboost"]``.

    Function calling (``chat_with_tools``, ``FunctionAgent``): tools are rendered by the model's
    chat template and calls parsed back in its format (``metadata.is_function_calling_model`` is
    True only when the template supports tools); ``tool_required=True`` or a forcing
    ``tool_choice`` decodes the call under a JSON-schema constraint, so it always parses.
    ``structured_predict`` / ``as_structured_llm`` decode the answer under the output class's JSON
    schema (constrained decoding), whatever the model.
    """

    model_config = ConfigDict(extra="forbid")

    model_id: Optional[str] = Field(default=None, description="HF id, local folder or .gguf file; None = engine default.")
    engine_kwargs: dict = Field(default_factory=dict, description="Passed to KVBoostEngine.shared (from_pretrained).")
    engine: Any = Field(default=None, exclude=True, description="A loaded KVBoostEngine (lazily loaded if None).")
    context_window: Optional[int] = Field(default=None, description="Override of the engine's context window.")
    max_new_tokens: int = Field(default=256, description="Maximum tokens generated per call (metadata.num_output); "
                                                         "max_tokens= is accepted too.")
    temperature: float = Field(default=0.0, description="0 is greedy decoding.")
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: Optional[list[str]] = None
    strategy: Optional[str] = Field(default=None, description='"cacheblend" (engine default), "reuse" or "full".')
    recompute_ratio: Optional[float] = None
    timeout: Optional[float] = Field(default=None, description="Seconds a generation may take (TimeoutError past it).")
    generate_kwargs: dict = Field(default_factory=dict,
                                  description="Further generation options passed to the engine as is "
                                              "(e.g. repetition_penalty once the engine implements it).")

    @model_validator(mode="before")
    @classmethod
    def _max_tokens_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_tokens" in data:
            data = dict(data)
            value = data.pop("max_tokens")
            if "max_new_tokens" in data and data["max_new_tokens"] != value:
                raise InvalidConfigError(f"KVBoostLLM: max_tokens={value!r} conflicts with "
                                         f"max_new_tokens={data['max_new_tokens']!r}; give one")
            data["max_new_tokens"] = value
        return data

    @field_validator("generate_kwargs")
    @classmethod
    def _check_generate_kwargs(cls, value: dict) -> dict:
        return integration.check_generation_options(value, owner=cls.__name__, where="generate_kwargs",
                                                    reserved=_RESERVED, error=InvalidConfigError)

    @classmethod
    def class_name(cls) -> str:
        return "KVBoostLLM"

    @property
    def metadata(self) -> LLMMetadata:
        # PromptHelper packs context from these numbers, so the real window is needed: load.
        context_window = self.context_window or int(self.load_engine().context_window)
        return LLMMetadata(context_window=context_window, num_output=self.max_new_tokens,
                           is_chat_model=True, model_name=self.model_label,
                           is_function_calling_model=supports_tools(self.load_engine().tokenizer))

    def check_tools(self) -> None:
        """:class:`~kvboost_rag.errors.ToolsNotSupportedError` (saying which model to use instead)
        when this model's chat template has no tools; checked where LlamaIndex would only say "LLM
        must be a FunctionCallingLLM" (:func:`install_function_agent_check`)."""
        engine = self.load_engine()
        if not supports_tools(engine.tokenizer):
            raise ToolsNotSupportedError(tools_unsupported_message(self.model_label))

    # -- translation ---------------------------------------------------------------------------
    def _gen_kwargs(self, kwargs: dict) -> dict:
        """``engine.stream`` keyword arguments: fields, ``generate_kwargs``, then call arguments."""
        settings = {name: getattr(self, name) for name in _OPTION_FIELDS}
        return integration.generation_kwargs(settings, passthrough=self.generate_kwargs, call=kwargs,
                                             owner=type(self).__name__)

    def _chat_stream(self, messages: Sequence[ChatMessage], kwargs: dict) -> tuple[TokenStream, tuple]:
        """The engine stream of one chat call (nothing runs until it is iterated) and the query
        engine responses its telemetry goes to (:mod:`.telemetry`), captured now: a streamed
        answer finishes after the synthesizer has returned. The stream carries ``tool_turn`` (a
        :class:`~kvboost_rag.prompt.tools.ToolTurn` or None): ``tools`` / ``tool_choice`` in ``kwargs``
        (from :meth:`_prepare_chat_with_tools`) render tools; ``response_format`` (a pydantic
        class, a JSON schema, ``{"type": "json_object"}``...) constrains the answer."""
        kwargs = dict(kwargs)
        tools = kwargs.pop("tools", None)
        tool_choice = kwargs.pop("tool_choice", None)
        constraint = integration.response_format_constraint(kwargs.pop("response_format", None), owner="KVBoostLLM")
        engine = self.load_engine()
        gen_kwargs = self._gen_kwargs(kwargs)
        engine_messages = [message_to_engine(m) for m in messages]
        turn: Optional[ToolTurn] = None
        if tools:
            if constraint is not None:
                raise ValueError("KVBoostLLM: give tools or response_format, not both")
            turn = prepare_tool_turn(engine, engine_messages, tools, tool_choice)
            prompt, constraint = turn.segments, turn.constraint
        else:
            # documents pasted into text: the nodes retrieved for this synthesis, else the engine's
            # detection of stored texts (and write-behind's recognition of document-like blocks)
            prompt = engine.chat_segments(engine_messages)
        sinks = current_sinks()
        documents = retrieved_documents(sinks)
        if documents:  # a tool turn's segments are already a MarkedPrompt (prepare_tool_turn)
            prompt = integration.mark_documents(prompt, documents, engine)
            if turn is not None:
                turn.segments = prompt
        stream = engine.stream(prompt, **integration.constrained_kwargs(gen_kwargs, constraint, engine=engine, prompt=prompt))
        stream.tool_turn = turn
        return stream, sinks

    def _completion_stream(self, prompt: str, formatted: bool, kwargs: dict) -> tuple[TokenStream, tuple]:
        """``formatted=True`` sends the prompt as is; otherwise it is one user turn of the chat template."""
        engine = self.load_engine()
        if not formatted:
            return self._chat_stream([ChatMessage(role=MessageRole.USER, content=prompt)], kwargs)
        sinks = current_sinks()
        documents = retrieved_documents(sinks)
        if documents:
            prompt = integration.mark_documents(prompt, documents, engine)
        return engine.stream(prompt, **self._gen_kwargs(kwargs)), sinks

    async def _ensure_loaded(self) -> None:
        await self.aload_engine()  # a lazy load takes seconds: keep it off the event loop

    def _finish(self, result: Any, sinks: tuple) -> dict:
        """Telemetry of a finished answer, delivered to the query engine response(s) waiting for it."""
        extra = telemetry(result, self.model_label)
        deliver(sinks, extra)
        return extra

    def _completion(self, call: tuple[TokenStream, tuple]) -> CompletionResponse:
        stream, sinks = call
        for _ in stream:
            pass
        result = stream.result
        return CompletionResponse(text=result.text, additional_kwargs=self._finish(result, sinks))

    def _chat(self, call: tuple[TokenStream, tuple]) -> ChatResponse:
        response = self._completion(call)
        return self._to_chat(response, getattr(call[0], "tool_turn", None), call[0].result)

    @staticmethod
    def _to_chat(response: CompletionResponse, turn: Optional[ToolTurn] = None, result: Any = None) -> ChatResponse:
        if turn is not None and result is not None:
            parsed = turn.finish(result.text, (result.extra or {}).get("json"))
            return ChatResponse(message=_tool_call_message(parsed.content, parsed.tool_calls),
                                delta=response.delta, additional_kwargs=response.additional_kwargs)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=response.text),
                            delta=response.delta, additional_kwargs=response.additional_kwargs)

    def _stream_completion(self, call: tuple[TokenStream, tuple]) -> CompletionResponseGen:
        stream, sinks = call
        text = ""
        for delta in stream:
            text += delta
            yield CompletionResponse(text=text, delta=delta)
        result = stream.result
        # Closing response: the engine's final text (stop sequences trimmed) and its telemetry.
        yield CompletionResponse(text=result.text, delta="", additional_kwargs=self._finish(result, sinks))

    async def _astream_completion(self, call: tuple[TokenStream, tuple]) -> CompletionResponseAsyncGen:
        stream, sinks = call
        text = ""
        async for delta in stream:
            text += delta
            yield CompletionResponse(text=text, delta=delta)
        result = stream.result
        yield CompletionResponse(text=result.text, delta="", additional_kwargs=self._finish(result, sinks))

    # -- completion ----------------------------------------------------------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._completion(self._completion_stream(prompt, formatted, kwargs))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._stream_completion(self._completion_stream(prompt, formatted, kwargs))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        await self._ensure_loaded()
        response = None
        async for response in self._astream_completion(self._completion_stream(prompt, formatted, kwargs)):
            pass
        return CompletionResponse(text=response.text, additional_kwargs=response.additional_kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        await self._ensure_loaded()
        return self._astream_completion(self._completion_stream(prompt, formatted, kwargs))

    # -- chat ----------------------------------------------------------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(self._chat_stream(messages, kwargs))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        stream, sinks = self._chat_stream(messages, kwargs)  # now: arguments checked, telemetry target captured

        def gen() -> ChatResponseGen:
            answer = _StreamedChat(stream.tool_turn)
            for delta in stream:
                yield from answer.feed(delta)
            yield from answer.close(stream.result, self._finish(stream.result, sinks))

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        await self._ensure_loaded()
        response = None
        call = self._chat_stream(messages, kwargs)
        async for response in self._astream_completion(call):
            pass
        return self._to_chat(CompletionResponse(text=response.text, additional_kwargs=response.additional_kwargs),
                             call[0].tool_turn, call[0].result)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        await self._ensure_loaded()
        stream, sinks = self._chat_stream(messages, kwargs)

        async def gen() -> ChatResponseAsyncGen:
            answer = _StreamedChat(stream.tool_turn)
            async for delta in stream:
                for response in answer.feed(delta):
                    yield response
            for response in answer.close(stream.result, self._finish(stream.result, sinks)):
                yield response

        return gen()

    # -- function calling ----------------------------------------------------------------------
    def _prepare_chat_with_tools(self, tools: Sequence["BaseTool"], user_msg: Optional[Union[str, ChatMessage]] = None,
                                 chat_history: Optional[List[ChatMessage]] = None, verbose: bool = False,
                                 allow_parallel_tool_calls: bool = False, tool_required: bool = False,
                                 tool_choice: Any = None, **kwargs: Any) -> Dict[str, Any]:
        """``chat`` arguments for a turn with ``tools``: their OpenAI schemas, and ``tool_choice``
        (a tool name / ``"required"`` / ``{"type": "function", ...}``; ``tool_required=True`` is
        ``"required"``; default ``"auto"``). A forced call is constrained: it always parses."""
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str)
                            else user_msg)
        specs = [t.metadata.to_openai_tool(skip_length_check=True) for t in tools]
        if tool_choice is None:
            tool_choice = "required" if tool_required else "auto"
        return {"messages": messages, "tools": specs or None, "tool_choice": tool_choice if specs else None,
                **kwargs}

    def get_tool_calls_from_response(self, response: ChatResponse, error_on_no_tool_call: bool = True,
                                     **kwargs: Any) -> List[ToolSelection]:
        """The calls of a ``chat_with_tools`` answer (its ``ToolCallBlock`` blocks)."""
        calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
        if not calls and error_on_no_tool_call:
            raise ValueError(f"expected at least one tool call, got none: {response.message.content!r:.200}")
        out = []
        for c in calls:
            args = c.tool_kwargs
            if isinstance(args, str):
                args = json.loads(args) if args.strip() else {}
            out.append(ToolSelection(tool_id=c.tool_call_id or "", tool_name=c.tool_name, tool_kwargs=args))
        return out

    # -- structured output: constrained decoding to the output class's JSON schema ---------------
    @staticmethod
    def _structured_messages(prompt: "BasePromptTemplate", prompt_args: dict) -> list[ChatMessage]:
        return prompt.format_messages(**prompt_args)

    def _structured_kwargs(self, output_cls: type, llm_kwargs: Optional[Dict[str, Any]]) -> dict:
        kwargs = dict(llm_kwargs or {})
        for name in ("tools", "tool_choice", "tool_required"):
            kwargs.pop(name, None)  # a program's function-calling options: the schema constraint replaces them
        kwargs["response_format"] = output_cls
        return kwargs

    def structured_predict(self, output_cls: Type[Any], prompt: "BasePromptTemplate",
                           llm_kwargs: Optional[Dict[str, Any]] = None, **prompt_args: Any) -> Any:
        """An ``output_cls`` instance, decoded under its JSON schema (always parses; a budget
        ``max_new_tokens`` too small for the object raises ``StructuredOutputError``)."""
        response = self.chat(self._structured_messages(prompt, prompt_args),
                             **self._structured_kwargs(output_cls, llm_kwargs))
        return output_cls.model_validate_json(response.message.content)

    async def astructured_predict(self, output_cls: Type[Any], prompt: "BasePromptTemplate",
                                  llm_kwargs: Optional[Dict[str, Any]] = None, **prompt_args: Any) -> Any:
        response = await self.achat(self._structured_messages(prompt, prompt_args),
                                    **self._structured_kwargs(output_cls, llm_kwargs))
        return output_cls.model_validate_json(response.message.content)

    def stream_structured_predict(self, output_cls: Type[Any], prompt: "BasePromptTemplate",
                                  llm_kwargs: Optional[Dict[str, Any]] = None,
                                  **prompt_args: Any) -> Generator[Any, None, None]:
        """Yields the ``output_cls`` instance once complete (a partial object of a constrained
        answer is not validated on the way)."""
        stream = self.stream_chat(self._structured_messages(prompt, prompt_args),
                                  **self._structured_kwargs(output_cls, llm_kwargs))
        last = None
        for last in stream:
            pass
        yield output_cls.model_validate_json(last.message.content)

    async def astream_structured_predict(self, output_cls: Type[Any], prompt: "BasePromptTemplate",
                                         llm_kwargs: Optional[Dict[str, Any]] = None,
                                         **prompt_args: Any) -> AsyncGenerator[Any, None]:
        stream = await self.astream_chat(self._structured_messages(prompt, prompt_args),
                                         **self._structured_kwargs(output_cls, llm_kwargs))

        async def gen() -> AsyncGenerator[Any, None]:
            last = None
            async for last in stream:
                pass
            yield output_cls.model_validate_json(last.message.content)

        return gen()


def install_function_agent_check() -> None:
    """``FunctionAgent(llm=KVBoostLLM(...))`` over a model whose chat template has no tools: the
    agent's step raises :class:`~kvboost_rag.errors.ToolsNotSupportedError` (a ``ValueError``, as
    LlamaIndex's own error is) naming the model and one that supports tools, where LlamaIndex says
    only "LLM must be a FunctionCallingLLM". Only KVBoostLLM agents are affected; installed once,
    on import. (``AgentWorkflow.from_tools_or_functions`` picks a ``ReActAgent`` for such a model,
    from ``metadata.is_function_calling_model``, which stays the template's truth.)"""
    try:
        from llama_index.core.agent.workflow import FunctionAgent
    except ImportError:  # pragma: no cover - an llama-index-core without workflow agents
        return
    original = FunctionAgent.take_step
    if getattr(original, "_kvboost_tools_check", False):
        return

    @functools.wraps(original)
    async def take_step(self, *args: Any, **kwargs: Any):
        if isinstance(self.llm, KVBoostLLM):
            self.llm.check_tools()
        return await original(self, *args, **kwargs)

    take_step._kvboost_tools_check = True
    FunctionAgent.take_step = take_step


install_function_agent_check()
