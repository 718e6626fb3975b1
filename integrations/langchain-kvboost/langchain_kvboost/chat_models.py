"""``ChatKVBoost``: a LangChain chat model backed by a local :class:`kvboost_rag.KVBoostEngine`.

Messages are rendered with the tokenizer's chat template (``engine.chat_segments``); content
blocks marked as documents (see :mod:`langchain_kvboost.documents`) stay separate document
segments, so their stored KV is reused. Documents pasted into plain text are found by the
engine's automatic detection when they were warmed. Telemetry: ``usage_metadata`` reports reused
KV tokens as ``input_token_details.cache_read``; ``response_metadata`` carries ``ttft_s`` and the
reused/recomputed/fresh token counts.
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Iterator, Optional, Sequence

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from kvboost_rag import integration
from kvboost_rag.streaming import TokenStream

from ._base import KVBoostParams, response_metadata, usage_metadata
from .documents import is_document_block

_MEDIA_BLOCKS = {"image", "image_url", "audio", "input_audio", "video", "file"}


def message_to_engine(message: BaseMessage) -> dict:
    """One LangChain message as an engine chat message (``{"role", "content"}``).

    Text blocks become text; document-marked blocks become ``Segment.document``; non-text output
    blocks of earlier AI turns (reasoning, tool calls) are dropped; media inputs are refused, since
    the engine serves text-only models. Role and joining rules: :mod:`kvboost_rag.integration`.
    """
    role = message.role if isinstance(message, ChatMessage) else message.type
    if isinstance(message.content, str):
        return integration.engine_message(role, [message.content])
    parts: list = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif is_document_block(block):
            parts.append(integration.document_part(block["text"]))
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif isinstance(block, dict) and block.get("type") in _MEDIA_BLOCKS:
            integration.refuse_media("ChatKVBoost", block["type"])
    return integration.engine_message(role, parts)


class ChatKVBoost(BaseChatModel, KVBoostParams):
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
    def _prepare(self, messages: Sequence[BaseMessage], stop: Optional[list[str]], kwargs: dict) -> TokenStream:
        engine = self.load_engine()
        # warmed documents pasted into text (stock chains) are detected by the engine
        prompt = engine.chat_segments([message_to_engine(m) for m in messages])
        return engine.stream(prompt, **self._generation_kwargs(stop, kwargs))

    def _chat_result(self, result: Any) -> ChatResult:
        message = AIMessage(
            content=result.text,
            usage_metadata=usage_metadata(result),
            response_metadata=response_metadata(result, self.model_label),
        )
        return ChatResult(generations=[ChatGeneration(message=message, generation_info={"finish_reason": result.finish_reason})])

    def _last_chunk(self, result: Any) -> ChatGenerationChunk:
        """Closing chunk: the only one carrying usage and metadata, so merging never duplicates them."""
        return ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                usage_metadata=usage_metadata(result),
                response_metadata=response_metadata(result, self.model_label),
                chunk_position="last",
            ),
            generation_info={"finish_reason": result.finish_reason},
        )

    # -- sync ----------------------------------------------------------------------------------
    def _generate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        stream = self._prepare(messages, stop, kwargs)
        for delta in stream:
            if run_manager:
                run_manager.on_llm_new_token(delta)
        return self._chat_result(stream.result)

    def _stream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        stream = self._prepare(messages, stop, kwargs)
        for delta in stream:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        yield self._last_chunk(stream.result)

    # -- async: the engine runs in a worker thread, the event loop only awaits a queue ---------
    async def _aprepare(self, messages, stop, kwargs) -> TokenStream:
        await self.aload_engine()  # a lazy load takes seconds: keep it off the event loop
        return self._prepare(messages, stop, kwargs)

    async def _agenerate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                         run_manager: Optional[AsyncCallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))
        stream = await self._aprepare(messages, stop, kwargs)
        async for delta in stream:
            if run_manager:
                await run_manager.on_llm_new_token(delta)
        return self._chat_result(stream.result)

    async def _astream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                       run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        stream = await self._aprepare(messages, stop, kwargs)
        async for delta in stream:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager:
                await run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        yield self._last_chunk(stream.result)
