"""``KVBoostLLM``: a LlamaIndex LLM backed by a local :class:`kvboost_rag.KVBoostEngine`.

Chat messages are rendered with the tokenizer's chat template (``engine.chat_segments``).
A ``CitableBlock`` in a message is handed over as a document segment, so its stored KV is reused
whatever text surrounds it (:class:`KVBoostSynthesizer` builds such messages from retrieved
nodes). Documents inside plain text (the stock compact synthesizer) are found by the engine's
automatic detection when they were warmed. Engine telemetry (TTFT, reused/recomputed/fresh
tokens) is in ``additional_kwargs`` of every final response.
"""
from __future__ import annotations

import asyncio
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
from llama_index.core.bridge.pydantic import Field
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from kvboost_rag import Segment
from kvboost_rag.engine import LazyEngineMixin
from kvboost_rag.streaming import TokenStream


_ROLES = {"chatbot": "assistant", "model": "assistant", "developer": "system", "function": "tool"}
_MEDIA = (ImageBlock, AudioBlock, VideoBlock, DocumentBlock)
_CALL_OVERRIDES = ("temperature", "max_new_tokens", "top_p", "top_k", "seed", "stop", "strategy", "recompute_ratio")


def message_to_engine(message: ChatMessage) -> dict:
    """One LlamaIndex message as an engine chat message.

    Blocks are concatenated in order: ``TextBlock`` as text, ``CitableBlock`` as one document
    segment (its text blocks); thinking/tool blocks of earlier turns are dropped; media blocks are
    refused (the engine serves text-only models).
    """
    role = message.role.value if isinstance(message.role, MessageRole) else str(message.role)
    parts: list = []
    for block in message.blocks:
        if isinstance(block, TextBlock):
            parts.append(block.text)
        elif isinstance(block, CitableBlock):
            parts.append(Segment.document("".join(b.text for b in block.content if isinstance(b, TextBlock))))
        elif isinstance(block, _MEDIA):
            raise ValueError(f"KVBoostLLM serves text-only models; got a {type(block).__name__}")
    if all(isinstance(p, str) for p in parts):
        return {"role": _ROLES.get(role, role), "content": "".join(parts)}
    return {"role": _ROLES.get(role, role), "content": parts}


def telemetry(result: Any, model_name: str) -> dict:
    """Engine measurements of one generation, for ``additional_kwargs``."""
    return {"model_name": model_name, **result.telemetry()}


class KVBoostLLM(LazyEngineMixin, CustomLLM):
    """LlamaIndex LLM over a local model with pre-encoded document KV reused.

    Build lazily from a model (``KVBoostLLM(model_id=None)`` is the engine default, SmolLM2) or
    around a loaded engine (``KVBoostLLM(engine=engine)``) to share one model and KV store with
    other components (``KVBoostWarmer``, LangChain's ``ChatKVBoost``).
    """

    model_id: Optional[str] = Field(default=None, description="HF id, local folder or .gguf file; None = engine default.")
    engine_kwargs: dict = Field(default_factory=dict, description="Passed to KVBoostEngine.shared (from_pretrained).")
    engine: Any = Field(default=None, exclude=True, description="A loaded KVBoostEngine (lazily loaded if None).")
    context_window: Optional[int] = Field(default=None, description="Override of the engine's context window.")
    max_new_tokens: int = Field(default=256, description="Maximum tokens generated per call (metadata.num_output).")
    temperature: float = Field(default=0.0, description="0 is greedy decoding.")
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: Optional[list[str]] = None
    strategy: Optional[str] = Field(default=None, description='"cacheblend" (engine default), "reuse" or "full".')
    recompute_ratio: Optional[float] = None

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
        params = {name: getattr(self, name) for name in _CALL_OVERRIDES}
        params.update({k: v for k, v in kwargs.items() if k in _CALL_OVERRIDES})
        out = {
            "max_new_tokens": int(params["max_new_tokens"]),
            "temperature": float(params["temperature"] or 0.0),
            "top_p": params["top_p"],
            "top_k": params["top_k"],
            "seed": params["seed"],
            "stop": list(params["stop"]) if params["stop"] else None,
        }
        for name in ("strategy", "recompute_ratio"):
            if params[name] is not None:
                out[name] = params[name]
        return out

    def _chat_stream(self, messages: Sequence[ChatMessage], kwargs: dict) -> TokenStream:
        engine = self.load_engine()
        # warmed documents pasted into text (stock synthesizers) are detected by the engine
        prompt = engine.chat_segments([message_to_engine(m) for m in messages])
        return engine.stream(prompt, **self._gen_kwargs(kwargs))

    def _completion_stream(self, prompt: str, formatted: bool, kwargs: dict) -> TokenStream:
        """``formatted=True`` sends the prompt as is; otherwise it is one user turn of the chat template."""
        engine = self.load_engine()
        if not formatted:
            return self._chat_stream([ChatMessage(role=MessageRole.USER, content=prompt)], kwargs)
        return engine.stream(prompt, **self._gen_kwargs(kwargs))

    async def _ensure_loaded(self) -> None:
        if self.engine is None:  # a lazy load takes seconds: keep it off the event loop
            await asyncio.get_running_loop().run_in_executor(None, self.load_engine)

    def _completion(self, stream: TokenStream) -> CompletionResponse:
        for _ in stream:
            pass
        result = stream.result
        return CompletionResponse(text=result.text, additional_kwargs=telemetry(result, self.model_label))

    def _chat(self, stream: TokenStream) -> ChatResponse:
        return self._to_chat(self._completion(stream))

    @staticmethod
    def _to_chat(response: CompletionResponse) -> ChatResponse:
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=response.text),
                            delta=response.delta, additional_kwargs=response.additional_kwargs)

    def _stream_completion(self, stream: TokenStream) -> CompletionResponseGen:
        text = ""
        for delta in stream:
            text += delta
            yield CompletionResponse(text=text, delta=delta)
        result = stream.result
        # Closing response: the engine's final text (stop sequences trimmed) and its telemetry.
        yield CompletionResponse(text=result.text, delta="", additional_kwargs=telemetry(result, self.model_label))

    async def _astream_completion(self, stream: TokenStream) -> CompletionResponseAsyncGen:
        text = ""
        async for delta in stream:
            text += delta
            yield CompletionResponse(text=text, delta=delta)
        result = stream.result
        yield CompletionResponse(text=result.text, delta="", additional_kwargs=telemetry(result, self.model_label))

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
        def gen() -> ChatResponseGen:
            for response in self._stream_completion(self._chat_stream(messages, kwargs)):
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

        async def gen() -> ChatResponseAsyncGen:
            async for response in self._astream_completion(self._chat_stream(messages, kwargs)):
                yield self._to_chat(response)

        return gen()
