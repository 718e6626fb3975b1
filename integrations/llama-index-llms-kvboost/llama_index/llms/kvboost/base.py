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

from typing import Any, Optional, Sequence

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
    VideoBlock,
)
from llama_index.core.bridge.pydantic import ConfigDict, Field, field_validator, model_validator
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from kvboost_rag import integration
from kvboost_rag.errors import InvalidConfigError
from kvboost_rag.streaming import TokenStream
from llama_index.llms.kvboost.telemetry import current_sinks, deliver, install_response_metadata

install_response_metadata()  # query engine responses carry the telemetry (Response.metadata["kvboost"])

_MEDIA = (ImageBlock, AudioBlock, VideoBlock, DocumentBlock)
# Fields that are engine generation options (same names as the engine's).
_OPTION_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "strategy", "recompute_ratio",
                  "timeout")
_RESERVED = _OPTION_FIELDS + ("max_tokens",)


def message_to_engine(message: ChatMessage) -> dict:
    """One LlamaIndex message as an engine chat message.

    Blocks are concatenated in order: ``TextBlock`` as text, ``CitableBlock`` as one document
    segment (its text blocks); thinking/tool blocks of earlier turns are dropped; media blocks are
    refused (the engine serves text-only models). Role and joining rules:
    :mod:`kvboost_rag.integration`.
    """
    parts: list = []
    for block in message.blocks:
        if isinstance(block, TextBlock):
            parts.append(block.text)
        elif isinstance(block, CitableBlock):
            parts.append(integration.document_part("".join(b.text for b in block.content if isinstance(b, TextBlock))))
        elif isinstance(block, _MEDIA):
            integration.refuse_media("KVBoostLLM", type(block).__name__)
    return integration.engine_message(message.role, parts)


def telemetry(result: Any, model_name: str) -> dict:
    """Engine measurements of one generation, for ``additional_kwargs``."""
    return integration.telemetry(result, model_name)


class KVBoostLLM(integration.EngineHolder, CustomLLM):
    """LlamaIndex LLM over a local model with pre-encoded document KV reused.

    Build lazily from a model (``KVBoostLLM(model_id=None)`` is the engine default, SmolLM2) or
    around a loaded engine (``KVBoostLLM(engine=engine)``) to share one model and KV store with
    other components (``KVBoostWarmer``, LangChain's ``ChatKVBoost``). ``max_tokens`` is accepted
    for ``max_new_tokens``; ``generate_kwargs`` passes further engine options through; unknown
    constructor or call arguments are an error. Telemetry (TTFT, reused / recomputed / fresh
    tokens, documents reused) is in ``additional_kwargs`` of every final response and, for query
    engines, in ``Response.metadata["kvboost"]``.
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
                           is_chat_model=True, model_name=self.model_label)

    # -- translation ---------------------------------------------------------------------------
    def _gen_kwargs(self, kwargs: dict) -> dict:
        """``engine.stream`` keyword arguments: fields, ``generate_kwargs``, then call arguments."""
        settings = {name: getattr(self, name) for name in _OPTION_FIELDS}
        return integration.generation_kwargs(settings, passthrough=self.generate_kwargs, call=kwargs,
                                             owner=type(self).__name__)

    def _chat_stream(self, messages: Sequence[ChatMessage], kwargs: dict) -> tuple[TokenStream, tuple]:
        """The engine stream of one chat call (nothing runs until it is iterated) and the query
        engine responses its telemetry goes to (:mod:`.telemetry`), captured now: a streamed
        answer finishes after the synthesizer has returned."""
        engine = self.load_engine()
        # warmed documents pasted into text (stock synthesizers) are detected by the engine
        prompt = engine.chat_segments([message_to_engine(m) for m in messages])
        return engine.stream(prompt, **self._gen_kwargs(kwargs)), current_sinks()

    def _completion_stream(self, prompt: str, formatted: bool, kwargs: dict) -> tuple[TokenStream, tuple]:
        """``formatted=True`` sends the prompt as is; otherwise it is one user turn of the chat template."""
        engine = self.load_engine()
        if not formatted:
            return self._chat_stream([ChatMessage(role=MessageRole.USER, content=prompt)], kwargs)
        return engine.stream(prompt, **self._gen_kwargs(kwargs)), current_sinks()

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
        return self._to_chat(self._completion(call))

    @staticmethod
    def _to_chat(response: CompletionResponse) -> ChatResponse:
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
        call = self._chat_stream(messages, kwargs)  # now: arguments checked, telemetry target captured

        def gen() -> ChatResponseGen:
            for response in self._stream_completion(call):
                yield self._to_chat(response)

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        await self._ensure_loaded()
        response = None
        async for response in self._astream_completion(self._chat_stream(messages, kwargs)):
            pass
        return self._to_chat(CompletionResponse(text=response.text, additional_kwargs=response.additional_kwargs))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        await self._ensure_loaded()
        call = self._chat_stream(messages, kwargs)

        async def gen() -> ChatResponseAsyncGen:
            async for response in self._astream_completion(call):
                yield self._to_chat(response)

        return gen()
