"""The documents an engine knows by their text: the token ids each is encoded and reused with, and
the :class:`~kvboost_rag.prompt.segments.DocumentDetector` that finds them inside flat prompts.

A document's ids come from one place (:func:`~kvboost_rag.prompt.segments.tokenize_text`: the
text alone, no special tokens), at warm time and at query time alike, so stored KV always matches
the prompt's ids. Every prompt tokenizes its documents again, so the ids of recently seen texts
are kept (LRU, bounded by :data:`TOKENIZED_DOCS_CACHE`; a text that fell out is only tokenized
again).
"""
from __future__ import annotations

import functools
from typing import Iterable, Tuple

from kvboost_rag import validate
from kvboost_rag.errors import EmptyInputError
from kvboost_rag.prompt.segments import DocumentDetector, tokenize_text

__all__ = ["DocumentTexts", "TOKENIZED_DOCS_CACHE"]

#: Distinct document texts whose token ids are kept (least recently used dropped first).
TOKENIZED_DOCS_CACHE = 8192


class DocumentTexts:
    """Token ids of document texts (checked, cached) and the detector of the registered ones."""

    def __init__(self, tokenizer, *, cache_size: int = TOKENIZED_DOCS_CACHE) -> None:
        self.tokenizer = tokenizer
        self.detector = DocumentDetector()
        self._cached_ids = functools.lru_cache(maxsize=cache_size)(self._tokenize)

    def ids(self, text: str) -> list[int]:
        """The ids a document is encoded with and reused with (tokenized alone, no specials); an
        :class:`~kvboost_rag.errors.EmptyInputError` for a blank text or one with no tokens."""
        validate.text("a document", text)
        if not text or not text.strip():
            raise EmptyInputError("A document is empty; there is nothing to encode.")
        return list(self._cached_ids(text))

    def _tokenize(self, text: str) -> tuple[int, ...]:
        ids = tuple(tokenize_text(self.tokenizer, text))
        if not ids:
            raise EmptyInputError("A document tokenizes to no tokens.")
        return ids

    def register(self, text: str) -> None:
        """Make ``text`` detectable inside flat prompts."""
        self.detector.register(text)

    def register_entries(self, entries: Iterable[Tuple[str, str]]) -> None:
        """Register the texts of ``(key, text)`` pairs, as a store watch lists stored entries
        (:class:`~kvboost_rag.store.watch.StoreWatch`)."""
        for _key, text in entries:
            self.detector.register(text)
