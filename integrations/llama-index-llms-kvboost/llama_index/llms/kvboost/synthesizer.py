"""``KVBoostSynthesizer``: hands retrieved nodes to the LLM as separate document segments.

Stock synthesizers format nodes into one string, so KV reuse then rests on the engine finding the
warmed texts verbatim (it does as long as the nodes fit unchanged). This synthesizer instead puts
each node's text (``node.get_content(MetadataMode.LLM)``, exactly what :class:`KVBoostWarmer`
warms) in its own ``CitableBlock``, which :class:`KVBoostLLM` turns into a document segment:
reuse no longer depends on text matching or on how a prompt helper repacks chunks.
All nodes go into one prompt (no refine passes); pick ``similarity_top_k`` so they fit.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from llama_index.core.base.llms.types import ChatMessage, CitableBlock, MessageRole, TextBlock
from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.llms import LLM
from llama_index.core.llms.llm import astream_chat_response_to_tokens, stream_chat_response_to_tokens
from llama_index.core.prompts.mixin import PromptDictType
from llama_index.core.response_synthesizers.base import BaseSynthesizer
from llama_index.core.types import RESPONSE_TEXT_TYPE

DEFAULT_INSTRUCTION = "Answer the question using only the documents below."


class KVBoostSynthesizer(BaseSynthesizer):
    """One chat turn: instruction, one ``CitableBlock`` per retrieved node (retriever order), question.

    Use with ``index.as_query_engine(llm=llm, response_synthesizer=KVBoostSynthesizer(llm=llm))``
    or ``RetrieverQueryEngine(retriever, response_synthesizer=KVBoostSynthesizer(llm=llm))``.
    """

    def __init__(
        self,
        llm: LLM,
        *,
        instruction: str = DEFAULT_INSTRUCTION,
        system_prompt: Optional[str] = None,
        callback_manager: Optional[CallbackManager] = None,
        streaming: bool = False,
    ) -> None:
        super().__init__(llm=llm, callback_manager=callback_manager, streaming=streaming)
        self._instruction = instruction
        self._system_prompt = system_prompt

    def _get_prompts(self) -> PromptDictType:
        return {}  # the prompt is built from blocks, not from a template

    def _update_prompts(self, prompts: PromptDictType) -> None:
        pass

    def messages(self, query_str: str, text_chunks: Sequence[str]) -> list[ChatMessage]:
        """The chat messages sent to the LLM (the engine joins the parts with blank lines)."""
        blocks: list = [TextBlock(text=self._instruction)]
        for i, text in enumerate(text_chunks, 1):
            blocks.append(CitableBlock(content=[TextBlock(text=text)], title=f"Document {i}", source=str(i)))
        blocks.append(TextBlock(text=f"Question: {query_str}"))
        messages = [ChatMessage(role=MessageRole.USER, blocks=blocks)]
        if self._system_prompt:
            messages.insert(0, ChatMessage(role=MessageRole.SYSTEM, content=self._system_prompt))
        return messages

    def get_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any) -> RESPONSE_TEXT_TYPE:
        messages = self.messages(query_str, text_chunks)
        if self._streaming:
            return stream_chat_response_to_tokens(self._llm.stream_chat(messages, **response_kwargs))
        return self._llm.chat(messages, **response_kwargs).message.content or ""

    async def aget_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any) -> RESPONSE_TEXT_TYPE:
        messages = self.messages(query_str, text_chunks)
        if self._streaming:
            return await astream_chat_response_to_tokens(await self._llm.astream_chat(messages, **response_kwargs))
        return (await self._llm.achat(messages, **response_kwargs)).message.content or ""
