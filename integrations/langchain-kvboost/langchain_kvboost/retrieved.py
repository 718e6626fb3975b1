"""The documents a chain retrieved, for the chat model / LLM at the end of the same chain.

A stock LCEL chain (``{"context": retriever | format_docs, "question": ...} | prompt | chat``)
pastes its documents into one flat prompt: the model sees text only. Yet the framework knows
which texts are documents: the retriever's output (``on_retriever_end``) and ``Document`` objects
given to a chain as input (``create_stuff_documents_chain``'s ``context``). A callback handler,
added to every LangChain run of this process once ``langchain_kvboost`` is imported (a configure
hook, as LangChain's own tracers are), records their ``page_content`` under the run's root. When
:class:`~langchain_kvboost.ChatKVBoost` or :class:`~langchain_kvboost.KVBoostLLM` runs inside that
chain, the texts found verbatim in its prompt become document segments
(:func:`kvboost_rag.frameworks.options.mark_documents`): their stored KV is reused and, the first
time, they are stored after the answer, however short, with no warm step.

Bounded: a root's entry is dropped when its run ends (and the oldest beyond
:attr:`RetrievedDocuments.max_runs` are dropped), so a process running chains forever holds only
the runs in flight.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from contextvars import ContextVar
from typing import Any, Optional
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.tracers.context import register_configure_hook


def _texts(value: Any) -> list[str]:
    """``page_content`` of the ``Document`` objects in a run's inputs: the value itself, a list of
    them, or a dict's values (one level: a chain's named inputs)."""
    values = value.values() if isinstance(value, dict) else [value]
    out: list[str] = []
    for v in values:
        items = v if isinstance(v, (list, tuple)) else [v]
        out.extend(d.page_content for d in items if isinstance(d, Document) and d.page_content.strip())
    return out


class RetrievedDocuments(BaseCallbackHandler):
    """Records, per root run, the document texts its retrievers returned or its chains were given."""

    run_inline = True  # bookkeeping only: never hop to an executor
    max_runs = 4096  # runs tracked at most (parents of runs in flight)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parent: "OrderedDict[UUID, Optional[UUID]]" = OrderedDict()
        self._docs: dict[UUID, list[str]] = {}

    # -- bookkeeping ---------------------------------------------------------------------------
    def _start(self, run_id: UUID, parent_run_id: Optional[UUID]) -> None:
        with self._lock:
            self._parent[run_id] = parent_run_id
            while len(self._parent) > self.max_runs:
                old, _ = self._parent.popitem(last=False)
                self._docs.pop(old, None)

    def _end(self, run_id: UUID) -> None:
        with self._lock:
            self._parent.pop(run_id, None)
            self._docs.pop(run_id, None)

    def _root(self, run_id: Optional[UUID]) -> Optional[UUID]:
        seen = 0
        while run_id is not None and self._parent.get(run_id) is not None and seen < 256:
            run_id, seen = self._parent[run_id], seen + 1
        return run_id

    def _add(self, parent_run_id: Optional[UUID], texts: list[str]) -> None:
        if not texts:
            return
        with self._lock:
            root = self._root(parent_run_id)
            if root is not None:
                known = self._docs.setdefault(root, [])
                known.extend(t for t in texts if t not in known)

    def documents(self, parent_run_id: Optional[UUID]) -> list[str]:
        """The document texts recorded in the chain a model run (child of ``parent_run_id``) is part of."""
        with self._lock:
            root = self._root(parent_run_id)
            return list(self._docs.get(root, ())) if root is not None else []

    # -- callbacks -----------------------------------------------------------------------------
    def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: UUID, parent_run_id: Optional[UUID] = None,
                       **kwargs: Any) -> None:
        self._start(run_id, parent_run_id)
        self._add(run_id, _texts(inputs))

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id)

    def on_retriever_start(self, serialized: Any, query: str, *, run_id: UUID, parent_run_id: Optional[UUID] = None,
                           **kwargs: Any) -> None:
        self._start(run_id, parent_run_id)

    def on_retriever_end(self, documents: Any, *, run_id: UUID, parent_run_id: Optional[UUID] = None,
                         **kwargs: Any) -> None:
        self._add(run_id, _texts(list(documents or ())))
        self._end(run_id)

    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id)


RETRIEVED = RetrievedDocuments()
_HOOK: ContextVar[Optional[RetrievedDocuments]] = ContextVar("kvboost_retrieved_documents", default=RETRIEVED)
register_configure_hook(_HOOK, inheritable=True)


def retrieved_documents(run_manager: Any) -> list[str]:
    """The document texts of the chain a model call (its ``run_manager``) runs in; [] outside one."""
    parent = getattr(run_manager, "parent_run_id", None)
    return RETRIEVED.documents(parent) if parent is not None else []
