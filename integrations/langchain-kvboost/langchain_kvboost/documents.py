"""Handing retrieved documents to :class:`ChatKVBoost` so their stored KV is reused.

Two routes reach the engine:

* **Explicit** (preferred): each document is its own content block of the human message,
  marked as a document. The block is a standard LangChain text block with the marker in its
  ``extras`` field, ``{"type": "text", "text": ..., "extras": {"kvboost_document": True}}``, so it
  survives langchain-core message handling (``_normalize_messages``, prompt templates, message
  history) and any other chat model simply reads it as text. A top-level
  ``"kvboost_document": True`` key is accepted too. :func:`documents_to_message` and the
  :class:`DocumentsPrompt` runnable build such messages from retrieved ``Document`` objects.
  The engine then takes each document's tokens exactly as they were warmed, whatever text
  surrounds them.
* **Automatic**: a stock chain (``create_stuff_documents_chain``, ``retriever | format_docs``)
  pastes documents into one flat string; the engine finds warmed texts in it verbatim. That only
  works if the warmed text is exactly what the chain inserts, which is why :func:`warm_documents`
  renders documents with the same ``document_prompt`` the chain uses (``page_content`` by default).
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

from langchain_core.documents import Document
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from langchain_core.prompt_values import ChatPromptValue
from langchain_core.prompts import BasePromptTemplate, format_document
from langchain_core.runnables import RunnableConfig, RunnableSerializable

DOCUMENT_FLAG = "kvboost_document"

DEFAULT_INSTRUCTION = "Answer the question using only the documents below."


def document_block(text: str) -> dict:
    """A text content block marked as a document (one per document, in retriever order)."""
    return {"type": "text", "text": text, "extras": {DOCUMENT_FLAG: True}}


def is_document_block(block: Any) -> bool:
    """Whether a content block was marked as a document by :func:`document_block` (or by hand)."""
    if not isinstance(block, dict) or block.get("type") != "text":
        return False
    extras = block.get("extras")
    return bool(block.get(DOCUMENT_FLAG) or (isinstance(extras, dict) and extras.get(DOCUMENT_FLAG)))


def render_document(doc: Document | str, document_prompt: Optional[BasePromptTemplate] = None) -> str:
    """The exact text a chain inserts for ``doc``: ``page_content``, or ``document_prompt``'s output."""
    if isinstance(doc, str):
        return doc
    if document_prompt is None:
        return doc.page_content
    return format_document(doc, document_prompt)


def documents_to_message(
    documents: Sequence[Document | str],
    question: str,
    *,
    instruction: str = DEFAULT_INSTRUCTION,
    document_prompt: Optional[BasePromptTemplate] = None,
) -> HumanMessage:
    """A human message: ``instruction``, one document block per document, then the question.

    Each document block holds exactly the rendered text that was warmed; the engine joins the
    parts of a message that contains documents with a blank line.
    """
    content: list[dict] = [{"type": "text", "text": instruction}]
    content.extend(document_block(render_document(doc, document_prompt)) for doc in documents)
    content.append({"type": "text", "text": f"Question: {question}"})
    return HumanMessage(content=content)


class DocumentsPrompt(RunnableSerializable[dict, ChatPromptValue]):
    """LCEL step ``{"context": [Document, ...], "question": str} -> ChatPromptValue``.

    Use it where a ``ChatPromptTemplate`` would flatten the documents into one string::

        chain = {"context": retriever, "question": RunnablePassthrough()} | DocumentsPrompt() | chat
    """

    instruction: str = DEFAULT_INSTRUCTION
    system_message: Optional[str] = None
    document_prompt: Optional[BasePromptTemplate] = None
    context_key: str = "context"
    question_key: str = "question"

    def invoke(self, input: dict, config: Optional[RunnableConfig] = None, **kwargs: Any) -> ChatPromptValue:
        return self._call_with_config(self._build, input, config, run_type="prompt")

    def _build(self, input: dict) -> ChatPromptValue:
        messages: list[BaseMessage] = []
        if self.system_message:
            messages.append(SystemMessage(content=self.system_message))
        messages.append(
            documents_to_message(
                input[self.context_key],
                input[self.question_key],
                instruction=self.instruction,
                document_prompt=self.document_prompt,
            )
        )
        return ChatPromptValue(messages=messages)


def warm_documents(
    target: Any,
    documents: Iterable[Document | str],
    *,
    document_prompt: Optional[BasePromptTemplate] = None,
    batch_size: int = 8,
    progress: bool = False,
):
    """Encode and store the KV of ``documents`` as the chain will insert them.

    ``target`` is a :class:`ChatKVBoost`, a :class:`KVBoostLLM` or a ``KVBoostEngine``. Returns
    the engine's ``WarmReport``; documents already in the store are skipped by the engine.
    """
    engine = target.load_engine() if hasattr(target, "load_engine") else target
    texts = [render_document(doc, document_prompt) for doc in documents]
    return engine.warm(texts, batch_size=batch_size, progress=progress)
