"""LangChain integration of kvboost-rag: local HF models answering with reused document KV.

``ChatKVBoost`` (chat model) and ``KVBoostLLM`` (string LLM) share one ``KVBoostEngine``.
Retrieved documents reach the engine as document-marked content blocks
(:func:`documents_to_message`, :class:`DocumentsPrompt`) or, in stock chains that paste them into
a flat prompt, through the engine's automatic detection of warmed texts
(:func:`warm_documents` warms exactly what the chain inserts).
"""
from importlib import metadata

from .chat_models import ChatKVBoost, message_to_engine
from .documents import (
    DOCUMENT_FLAG,
    DocumentsPrompt,
    document_block,
    documents_to_message,
    is_document_block,
    render_document,
    warm_documents,
)
from .llms import KVBoostLLM

try:
    __version__ = metadata.version("langchain-kvboost")
except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "ChatKVBoost",
    "KVBoostLLM",
    "DocumentsPrompt",
    "documents_to_message",
    "document_block",
    "is_document_block",
    "render_document",
    "warm_documents",
    "message_to_engine",
    "DOCUMENT_FLAG",
    "__version__",
]
